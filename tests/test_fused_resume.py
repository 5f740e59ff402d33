"""The optimizer under fp16's grad scaler, on the CPU: a resume that switches --use_fused_adam on or off, and the lr
schedule on steps the scaler skips. accelerate gives a GradScaler only to GPUs; these tests hand it torch's CPU one,
which speaks the same protocol to the optimizer (fused AdamW takes grad_scale/found_inf into its kernel)."""

import pytest
import torch

import train_controlnet as tc


def optimizer_for(fused, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    args = tc.make_parser().parse_args(["--learning_rate=1e-2"] + (["--use_fused_adam"] if fused else []))
    return model, tc.make_optimizer(args, model.parameters())


def scaled_step(model, optimizer, scaler):
    loss = model(torch.ones(2, 4)).square().sum()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()


@pytest.mark.parametrize("saved_fused", [False, True], ids=["non-fused checkpoint", "fused checkpoint"])
def test_a_resume_keeps_this_runs_adamw_implementation(saved_fused):
    """Checkpoint written with one implementation, resumed with the other: the resumed run steps under the scaler,
    with the implementation it asked for, from the checkpoint's moments."""
    model, optimizer = optimizer_for(saved_fused)
    scaled_step(model, optimizer, torch.amp.GradScaler("cpu"))
    state = optimizer.state_dict()

    resumed_model, resumed = optimizer_for(not saved_fused)
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(state)
    before = resumed_model.weight.detach().clone()
    scaled_step(resumed_model, resumed, torch.amp.GradScaler("cpu"))  # non-fused -> fused: AssertionError unfixed
    assert not torch.equal(before, resumed_model.weight)
    assert bool(resumed.param_groups[0]["fused"]) == (not saved_fused)  # fused -> non-fused: stayed fused unfixed
    assert all(s["step"].item() == 2 for s in resumed.state.values())


class NaNLoss:
    """controlnet_loss stand-in: a tiny trainable model whose loss is NaN when the batch says so."""

    def __init__(self, model):
        self.model = model

    def __call__(self, vae, unet, controlnet, noise_scheduler, pixel_values, conditions, states, weight_dtype,
                 added_cond_kwargs=None):
        loss = self.model(pixel_values.flatten(1)[:, :4]).square().mean()
        return loss * float("nan") if states else loss


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused adamw"])
def test_the_lr_schedule_waits_on_steps_the_scaler_skips(fused, monkeypatch):
    """Under fp16 a non-finite step changes no weight and must not advance the lr schedule either. With fused AdamW
    the scaler always calls the optimizer (its kernel skips), so accelerate cannot tell and stepped the schedule."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu")  # what accelerate makes for fp16 on a GPU
    model, optimizer = optimizer_for(fused)
    lr_scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0, num_training_steps=10)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    loss = NaNLoss(model)
    monkeypatch.setattr(tc, "controlnet_loss", loss)
    args = tc.make_parser().parse_args(["--resolution=8", "--condition_resolution=4"])
    batch = {"pixel_values": torch.full((2, 3, 8, 8), 100, dtype=torch.uint8),
             "conditioning_pixel_values": torch.full((2, 3, 4, 4), 100, dtype=torch.uint8), "input_ids": None}
    meter = tc.IntervalMeter(accelerator.device)

    def step(nan):
        return tc.train_step(batch, (None, None, model), None, optimizer, lr_scheduler, lambda ids: nan, meter,
                             accelerator, args, torch.float32)

    assert step(nan=False)
    lr, weight = lr_scheduler.get_last_lr()[0], model.weight.detach().clone()
    assert not step(nan=True)  # the scaler skips it
    assert torch.equal(weight, model.weight)
    assert lr_scheduler.get_last_lr()[0] == lr, "the lr schedule advanced on a skipped step"
    assert step(nan=False) and lr_scheduler.get_last_lr()[0] < lr
