"""--use_8bit_adam with --channels_last: bitsandbytes' optimizers make each parameter contiguous at their first step
(`p.data = p.data.contiguous()`), which would turn the ControlNet's conv weights back from channels_last after step 1
(and make DDP warn of mismatched gradient strides at every step). The trained weights' layout must not change."""

import pytest
import torch

import train_controlnet as tc


@pytest.mark.parametrize("flags", [["--use_8bit_adam"], []], ids=["adamw8bit", "adamw"])
def test_the_controlnet_keeps_its_layout_through_the_optimizer_step(flags):
    pytest.importorskip("bitsandbytes")
    args = tc.make_parser().parse_args(["--channels_last", "--learning_rate=1e-2"] + flags)
    unet, vae, controlnet = (torch.nn.Conv2d(4, 8, 3) for _ in range(3))
    tc.use_channels_last(unet, vae, controlnet, args)
    optimizer = tc.make_optimizer(args, controlnet.parameters())
    strides = [p.stride() for p in controlnet.parameters()]
    before = controlnet.weight.detach().clone()
    x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    controlnet(x).square().mean().backward()
    optimizer.step()
    assert not torch.equal(before, controlnet.weight)  # the step did change the weights
    assert [p.stride() for p in controlnet.parameters()] == strides
    assert unet.weight.is_contiguous(memory_format=torch.channels_last)  # the frozen models use it either way
    assert controlnet.weight.is_contiguous(memory_format=torch.channels_last) == (not args.use_8bit_adam)
