"""Golden values: the first per-step losses of tiny fp32 runs, pinned to numbers computed once (torchtune style).

Relative checks (resumed == uninterrupted, compiled == plain) pass when both sides change together; these fail on
any change to the loss, batching, schedule, optimizer or initialisation. The values came from peftsum at commit
baad34c (before the training-loop refactor) on a 2-core AMD EPYC; other CPUs round fp32 differently in the last bits,
far below the tolerance, while a real change moves the losses by 1e-3 or more within a few steps.

If a deliberate change moves them, recompute with the command in each test's failure message and say why in the
commit.
"""

import pytest
from conftest import step_losses

from peftsum.cli import main

TOLERANCE = 2e-5  # absolute, in nats

# Settings that make every step count: learning rates high enough to move a tiny model visibly in six steps,
# LoRA dropout (the training RNG), gradient accumulation over uneven batches (24 examples in batches of 5), across an epoch boundary.
COMMON = ["--epochs", "2", "--max-steps", "6", "--batch-size", "5", "--precision", "fp32", "--eval-size", "0",
          "--data.train_eval_size", "0", "--lora.dropout", "0.1", "--lora.lr", "1e-2", "--prompt.lr", "0.3",
          "--finetune.lr", "1e-2", "--finetune.last_blocks", "1", "--train.grad_accum", "2",
          "--train.checkpoint_every", "0"]

GOLDEN = {
    ('gpt2', 'lora'): [5.703435330777555, 5.711780140700849, 5.681323005157767, 5.632911223531421, 5.636991334192961, 5.641365500057445],
    ('gpt2', 'prompt'): [5.70740117253484, 5.711181936912166, 5.710478254892294, 5.714962651820782, 5.715786535763046, 5.688089707318475],
    ('gpt2', 'finetune'): [5.70302354967272, 5.4867673707239835, 5.123956476600425, 4.885589599609375, 4.75693386040845, 4.668858247644761],
    ('llama', 'lora'): [5.700855564426732, 5.685650871795358, 5.656667172330097, 5.639505855372695, 5.619340766980811, 5.611035515280331],
    ('llama', 'prompt'): [5.701436429410368, 5.69864721205628, 5.70263671875, 5.701392335318477, 5.6976318359375, 5.679301991182215],
    ('llama', 'finetune'): [5.700855564426732, 5.546908776736954, 5.225051435452063, 4.969184083365352, 4.806902098424226, 4.667369169347427],
}


@pytest.mark.parametrize("kind, method", list(GOLDEN))
def test_first_step_losses_match_the_golden_values(kind, method, tiny_model_dirs, tiny_data, tmp_path):
    folder = tmp_path / method
    assert main(["train", "--method", method, "--model", str(tiny_model_dirs[kind]), "--random-init",
                 "--data", str(tiny_data), "--out", str(folder), *COMMON]) == 0
    losses = step_losses(folder)
    assert len(losses) == len(GOLDEN[(kind, method)]), losses
    worst = max(abs(a - b) for a, b in zip(losses, GOLDEN[(kind, method)]))
    assert worst <= TOLERANCE, f"losses moved by {worst:.2e}: {losses!r}"
