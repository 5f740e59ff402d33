"""The training step driven on fake `cuda:0` tensors, on this CPU-only build: the device guard.

torch's FakeTensorMode makes tensors that say they are on cuda:0 and hold no data; it refuses mixed cpu/cuda
operands and every read of a device value back to the host, as CUDA does. FakeCuda below adds what it does not see,
the host syncs a GPU hides: a blocking host-to-device copy, a non_blocking one from pageable memory (which the CUDA
runtime makes synchronous), a CPU generator or CPU tensor among a device op's operands. Host work (tokenising,
draws, lists of indices) runs for real; pinned memory is simulated. Autograd cannot run on fake CUDA tensors here
(its engine asks for a CUDA device guard), so the step runs under no_grad with stand-in gradients; the meta-device
tests (test_device.py) cover backward.
"""

import contextlib
import random

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.data._utils.pin_memory import pin_memory

import train_controlnet as tc

aten = torch.ops.aten
CUDA = torch.device("cuda:0")


def on_gpu(device):
    return device is not None and torch.device(device).type == "cuda"


class FakeCuda(FakeTensorMode):
    """FakeTensorMode for cuda:0 that records each host sync a step would make on a GPU (self.syncs) instead of
    raising, so that a test sees them all; a host read of a device value returns 1 (True for a finite check)."""

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)
        self.pinned = []  # the host tensors pinned so far, kept alive so that their memory is not reused
        self.syncs = []

    def is_pinned(self, tensor):
        ptr = tensor.untyped_storage().data_ptr()
        return any(p.untyped_storage().data_ptr() == ptr for p in self.pinned)

    def host_to_device(self, source, non_blocking):
        if not non_blocking:
            self.syncs.append(f"blocking host-to-device copy of {tuple(source.shape)}")
        elif not self.is_pinned(source):
            self.syncs.append(f"non_blocking copy of {tuple(source.shape)} from pageable host memory")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._pin_memory.default:
            self.pinned.append(args[0].clone())
            return self.pinned[-1]
        if func is aten.is_pinned.default:
            return self.is_pinned(args[0])
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        device_side = [t for t in tensors if isinstance(t, FakeTensor) and t.device.type == "cuda"]
        if not device_side and not on_gpu(kwargs.get("device")) and not any(isinstance(t, FakeTensor) for t in tensors):
            return func(*args, **kwargs)  # host work, for real
        name = func.__name__
        if func is aten._to_copy.default and not isinstance(args[0], FakeTensor) and on_gpu(kwargs.get("device")):
            self.host_to_device(args[0], kwargs.get("non_blocking", False))
        elif func is aten.copy_.default and device_side and not isinstance(args[1], FakeTensor):
            self.host_to_device(args[1], args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        elif func is aten._to_copy.default and device_side and not on_gpu(kwargs.get("device", CUDA)):
            self.syncs.append(f"device-to-host copy of {tuple(args[0].shape)}")
        elif func is aten._local_scalar_dense.default and device_side:
            self.syncs.append(f"host read of a device value ({tuple(args[0].shape)})")
            return True if args[0].dtype == torch.bool else 1
        else:
            if device_side and [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]:
                self.syncs.append(f"CPU tensor operand of {name}")
            generator = kwargs.get("generator")
            if generator is not None and generator.device.type != "cuda":
                self.syncs.append(f"CPU generator for {name}")
        return super().__torch_dispatch__(func, types, args, kwargs)


def getitem(tensor, index):
    """tensor[index] as the aten ops it stands for (slices, ints, None, Ellipsis, tensor indices)."""
    index = index if isinstance(index, tuple) else (index,)
    if Ellipsis in index:
        k = index.index(Ellipsis)
        named = sum(1 for i in index if i is not None and i is not Ellipsis)
        index = index[:k] + (slice(None),) * (tensor.dim() - named) + index[k + 1:]
    dim = 0
    for i in index:
        if i is None:
            tensor = aten.unsqueeze.default(tensor, dim)
            dim += 1
        elif isinstance(i, int):
            tensor = aten.select.int(tensor, dim, i)
        elif isinstance(i, slice):
            tensor = aten.slice.Tensor(tensor, dim, i.start, i.stop, i.step or 1)
            dim += 1
        elif isinstance(i, torch.Tensor) and i.dtype != torch.bool:
            tensor = aten.index.Tensor(tensor, [None] * dim + [i])
            dim += i.dim()
        else:
            raise NotImplementedError(f"index {i!r}")
    return tensor


class FakeCudaIndexing(TorchFunctionMode):
    """Python indexing of a fake CUDA tensor: torch's C++ indexing takes a CUDA device guard first, which a
    CPU-only build has not (it aborts); the same indexing as aten ops goes through FakeCuda like any op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__ and isinstance(args[0], FakeTensor) and args[0].device.type == "cuda":
            return getitem(*args)
        return func(*args, **(kwargs or {}))


class StepAccelerator:
    """What train_step asks of accelerate, on one fake GPU: no scaler, every micro-batch an optimisation step, and
    stand-in gradients for backward."""

    device, scaler, sync_gradients, num_processes = CUDA, None, True, 1

    def __init__(self, model):
        self.model = model

    def accumulate(self, model):
        return contextlib.nullcontext()

    def backward(self, loss):
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)

    def clip_grad_norm_(self, parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


class CountingScheduler:
    steps = 0

    def step(self):
        self.steps += 1


RECIPES = {
    "default": [],
    "three scales": ["--condition_scales", "2", "4", "8"],
    "lanczos": ["--interpolation=lanczos"],
    "realesrgan, clean share": ["--condition_scales", "2", "4", "--condition_degradation=realesrgan",
                                "--no_degradation_prob=0.5"],
}


def loader_batch(args, tokenizer, seed):
    """A batch as the DataLoader hands it over: tile pairs from the workers' make_tile_pair, collated, with the
    degradation draws, pinned. Captions: two real, two empty (the PromptEncoder's mixed case)."""
    from PIL import Image

    rng = random.Random(seed)
    pairs = []
    for i, caption in enumerate(["a cat", "", "a dog", ""]):
        image = Image.fromarray(torch.randint(0, 256, (80, 96, 3), dtype=torch.uint8,
                                              generator=torch.Generator().manual_seed(seed * 10 + i)).numpy())
        sample = {"__key__": f"k{i}", "jpg": b"", "txt": caption.encode()}
        with pytest.MonkeyPatch.context() as m:  # the decode is not what this test is about
            m.setattr(tc, "decode_image", lambda data, meta, args, image=image: image)
            pair = tc.make_tile_pair(sample, tokenizer, args, rng=rng)
        pair["caption"] = caption
        pair["input_ids"] = tokenizer(caption, max_length=tokenizer.model_max_length, padding="max_length",
                                      truncation=True, return_tensors="pt").input_ids[0]
        pairs.append(pair)
    batch = next(tc.with_degradation_draws([tc.collate_fn(pairs)], args.condition_degradation, rng))
    return pin_memory(batch)


class TextEncoder(torch.nn.Module):
    """Stand-ins for the networks, with their interfaces and real parameters on the device: the networks' own
    code is the libraries' (and torch's C++ takes CUDA device guards in some of it, which this build cannot), the
    step's code around them is what this guards."""

    def __init__(self, vocab):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 8)

    def forward(self, input_ids, return_dict=False):
        return (self.embed(input_ids),)


class VAE(torch.nn.Module):
    config = type("Config", (), {"scaling_factor": 0.18})

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 8, stride=8)

    def encode(self, pixels):
        latents = self.conv(pixels)
        dist = type("Dist", (), {"sample": lambda _, generator=None: latents + torch.randn(
            latents.shape, generator=generator, device=latents.device)})()
        return type("Out", (), {"latent_dist": dist})()


class ControlNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.cond = torch.nn.Conv2d(3, 4, 8, stride=8)
        self.latent = torch.nn.Conv2d(4, 4, 1)

    def forward(self, sample, timesteps, encoder_hidden_states, controlnet_cond, return_dict=False):
        residual = self.latent(sample) + self.cond(controlnet_cond) + encoder_hidden_states.mean()
        return [residual], residual * timesteps.float().mean()


class UNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, sample, timesteps, encoder_hidden_states, down_block_additional_residuals,
                mid_block_additional_residual, return_dict=False):
        out = self.conv(sample) + down_block_additional_residuals[0] + mid_block_additional_residual
        return (out + encoder_hidden_states.mean(),)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model, subfolder="tokenizer", use_fast=False)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_a_training_step_makes_no_host_sync_but_the_guards(tokenizer, tiny_model, recipe):
    """Two steps of train_step on fake cuda:0 (the first copies the constants, once): in the second, the only host
    sync is the non-finite guard's one read; every host tensor reaches the device in a non_blocking copy from
    pinned memory."""
    from diffusers import DDPMScheduler

    text_encoder, vae, unet, controlnet = TextEncoder(tokenizer.vocab_size), VAE(), UNet(), ControlNet()
    args = tc.make_parser().parse_args(["--resolution=64", "--condition_resolution=16"] + RECIPES[recipe])
    tc.constant.cache_clear()  # its device constants must belong to this mode
    mode = FakeCuda()
    try:
        with mode, FakeCudaIndexing(), torch.no_grad():
            batches = [loader_batch(args, tokenizer, seed) for seed in (0, 1)]  # host work, pinned as the loader does
            for model in (text_encoder, vae, unet, controlnet):
                model.to(CUDA)
            scheduler = DDPMScheduler.from_pretrained(tiny_model, subfolder="scheduler")
            encode_prompts = tc.PromptEncoder(text_encoder, tokenizer, CUDA)
            meter = tc.IntervalMeter(CUDA)
            accelerator = StepAccelerator(controlnet)
            optimizer = torch.optim.SGD(controlnet.parameters(), lr=1e-3)
            lr_scheduler = CountingScheduler()
            for batch in batches:
                mode.syncs.clear()
                finite = tc.train_step(batch, (vae, unet, controlnet), scheduler, optimizer, lr_scheduler,
                                       encode_prompts, meter, accelerator, args, torch.float32)
            assert finite and lr_scheduler.steps == 2 and meter.steps == 2
    finally:
        tc.constant.cache_clear()
    assert mode.syncs == ["host read of a device value (())"], mode.syncs


def test_the_recorder_sees_what_cuda_would_sync_on():
    """FakeCuda itself: each kind of hidden sync is recorded, and pinned memory copies without one."""
    mode = FakeCuda()
    host = torch.zeros(2, 3)
    with mode:
        host.to(CUDA)
        host.to(CUDA, non_blocking=True)
        pinned = host.pin_memory()
        assert pinned.is_pinned() and not host.is_pinned()
        on_device = pinned.to(CUDA, non_blocking=True)
        on_device.cpu()
        bool(on_device.sum() > 0)
        torch.randn(3, device=CUDA, generator=torch.Generator())
        torch.nn.functional.conv2d(torch.zeros(1, 3, 8, 8, device=CUDA), torch.zeros(4, 3, 3, 3))
        on_device * torch.tensor(2.0)  # a CPU scalar is fine on CUDA
    assert mode.syncs == ["blocking host-to-device copy of (2, 3)", "non_blocking copy of (2, 3) from pageable host memory",
                          "device-to-host copy of (2, 3)", "host read of a device value (())",
                          "CPU generator for randn.generator", "CPU tensor operand of convolution.default"]
