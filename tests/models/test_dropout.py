"""The CPU LoRA dropout: the rate, the scale, independent elements, reproducible masks, the
backward pass, and the same gradients with and without gradient checkpointing."""

import pytest
import torch

from lorakit.core.config import TrainConfig
from lorakit.models.dropout import CPUDropout, keep_mask


def test_drop_rate_scale_and_independence():
    torch.manual_seed(0)
    keep, scale = keep_mask(torch.Size([1000, 1000]), 0.05)
    dropped = ~keep
    rate = dropped.float().mean().item()
    # binomial standard deviation over 1e6 elements: 2.2e-4
    assert abs(rate - 0.05) < 1.5e-3
    assert scale == pytest.approx(1 / (1 - 3277 / 65536))
    assert (keep.float() * scale).mean().item() == pytest.approx(1.0, abs=2e-3)  # expectation kept
    # The four 16-bit uniforms cut from one 64-bit word are independent: neighbours are both
    # dropped at p^2, in every lane of the word.
    flat = dropped.flatten()
    for lane in range(3):
        pair = (flat[lane::4] & flat[lane + 1 :: 4][: flat[lane::4].numel()]).float().mean().item()
        assert abs(pair - 0.05**2) < 5e-4
    # and the rate holds in each lane (a lane with a constant high bit would drop ~2x or never)
    for lane in range(4):
        assert abs(flat[lane::4].float().mean().item() - 0.05) < 3e-3


@pytest.mark.parametrize("p", [0.001, 0.3, 0.9])
def test_other_rates(p):
    torch.manual_seed(1)
    keep, scale = keep_mask(torch.Size([400_000]), p)
    assert abs((~keep).float().mean().item() - p) < 4e-3
    assert (keep.float() * scale).mean().item() == pytest.approx(1.0, abs=0.02)


def test_masks_follow_the_seed_and_differ_between_calls():
    torch.manual_seed(3)
    a, _ = keep_mask(torch.Size([64, 64]), 0.1)
    b, _ = keep_mask(torch.Size([64, 64]), 0.1)
    torch.manual_seed(3)
    a2, _ = keep_mask(torch.Size([64, 64]), 0.1)
    assert torch.equal(a, a2)
    assert not torch.equal(a, b)


def test_forward_backward_and_eval():
    drop = CPUDropout(0.2)
    x = torch.randn(50, 70).abs().add_(0.1).requires_grad_()  # no zeros: y == 0 marks a drop
    y = drop(x)
    kept = y != 0
    scale = 1 / (1 - round(0.2 * 65536) / 65536)
    torch.testing.assert_close(y[kept], x[kept] * scale)
    g = torch.randn(50, 70)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * kept * scale)
    drop.eval()
    assert torch.equal(drop(x), x)
    assert torch.equal(CPUDropout(0.0)(x), x)


def test_peft_dropouts_are_replaced_and_checkpointing_gives_the_same_gradients(tiny_llama):
    from transformers import AutoModelForCausalLM

    from lorakit.models.loading import add_lora

    def gradients(checkpointing: bool, seed: int = 7):
        torch.manual_seed(0)
        cfg = TrainConfig(
            lora_r=4, lora_dropout=0.3, target_modules=["all-linear"], gradient_checkpointing=checkpointing
        )
        model = add_lora(cfg, AutoModelForCausalLM.from_pretrained(tiny_llama)).train()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        kinds = {type(m) for m in model.modules() if isinstance(m, torch.nn.Dropout)}
        ids = torch.arange(24).reshape(2, 12) % 100
        torch.manual_seed(seed)
        model(input_ids=ids, labels=ids).loss.backward()
        return kinds, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    kinds, plain = gradients(False)
    assert kinds == {CPUDropout}
    _, recomputed = gradients(True)  # the recompute redraws the same masks
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name])
    _, other = gradients(True, seed=8)  # other masks, other gradients: the dropout is at work
    assert any(not torch.allclose(other[n], plain[n]) for n in plain)
