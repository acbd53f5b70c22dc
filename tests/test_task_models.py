"""What the generic training path needs from every task's model."""

import pytest
import torch

from cliptime.tasks import TASKS, make_task

BATCHES = {
    "cliptime": lambda g: {
        "image": torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8, generator=g),
        "tokens": torch.randint(1, 1000, (4, 32), generator=g),
        "stage": torch.randint(0, 3, (4,), generator=g),
        "t": torch.rand(4, generator=g),
    },
    "tclap": lambda g: {
        "audio": 0.1 * torch.randn(4, 32000, generator=g),
        "tokens": torch.randint(1, 1000, (4, 32), generator=g),
        "neg_tokens": torch.randint(1, 1000, (4, 32), generator=g),
        "first": torch.tensor([0, 1, 2, 3]),
        "second": torch.tensor([1, 0, -1, -1]),
        "key": torch.tensor([2, 14, 40, 53]),
        "pair": torch.tensor([0, 0, -1, -1]),
        "ordered": torch.tensor([True, True, False, False]),
    },
}


@pytest.mark.parametrize("task_name", sorted(TASKS))
def test_every_trainable_parameter_gets_a_gradient(task_name):
    """DDP all-reduces a bucket only when all its parameters have gradients: one trainable parameter that the
    loss never uses leaves the workers' weights silently apart (and fails the next step)."""
    task = make_task(task_name, {})
    model = task.build_model()
    loss, _ = task.loss(model, BATCHES[task_name](torch.Generator().manual_seed(0)))
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_tclap_takes_clips_as_16_bit_pcm_as_it_takes_them_as_floats():
    """The data path ships clips as 16-bit integers; the model reads them as the same waveform in floats (and not
    as raw numbers 32,767 times louder, which embed otherwise)."""
    task = make_task("tclap")
    torch.manual_seed(0)
    model = task.build_model().eval()
    pcm = (0.1 * torch.randn(2, 32000)).mul(32767).round().to(torch.int16)
    with torch.no_grad():
        from_pcm = model.embed_audio(pcm)
        from_float = model.embed_audio(pcm.float() / 32767)
        raw_numbers = model.embed_audio(pcm.float())
    assert torch.allclose(from_pcm, from_float, atol=1e-5)
    assert not torch.allclose(from_pcm, raw_numbers, atol=1e-3)
