"""One OPDTrainer step under torchrun (gloo, CPU), for tests/integrations/test_trl.py: plain SGD at lr 1 without clipping, so
the update is minus the gradient DDP averaged. Each rank saves the completions it sampled; rank 0 saves the
student's weights before and after.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/integrations/trl_ddp_step.py OUT DIVERGENCE REDUCTION
"""
import sys
from pathlib import Path

import torch
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from opdlab.integrations.trl import OPDConfig, OPDTrainer  # noqa: E402
from opdlab.lm.modeling import build_model  # noqa: E402
from opdlab.lm.tokenizer import char_tokenizer  # noqa: E402
from test_trl import ALPHABET, PROMPTS, _recipe  # noqa: E402


class RecordingTrainer(OPDTrainer):
    """Keeps the last batch of completions it generated."""

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        self.recorded = {k: v.detach().cpu() for k, v in batch.items() if torch.is_tensor(v)}
        return batch


def main(out: Path, divergence: str, reduction: str) -> None:
    tok = char_tokenizer(ALPHABET)
    student, teacher = build_model(_recipe(0), tok), build_model(_recipe(1, 48), tok)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    args = OPDConfig(output_dir=str(out), divergence=divergence, method="opd_plus", baseline="expected",
                     reduction=reduction, per_device_train_batch_size=len(PROMPTS) // 2, max_completion_length=24,
                     max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0,
                     max_grad_norm=0.0, gradient_checkpointing=False, shuffle_dataset=False, use_cpu=True,
                     bf16=False, report_to="none", save_strategy="no", disable_tqdm=True, seed=0)
    trainer = RecordingTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok,
                               train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save(trainer.recorded, out / f"inputs{rank}.pt")
    if rank == 0:
        final = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        torch.save({"initial": initial, "final": {k: v.detach().cpu() for k, v in final.items()},
                    "num_processes": trainer.accelerator.num_processes}, out / "weights.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
