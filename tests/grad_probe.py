"""Computes one optimizer step's gradients with the training loop's own backward_step and saves
them (run plainly or under `accelerate launch`); used by test_train.py."""

import sys

import torch
from accelerate import Accelerator

from pokemon_gemma.collate import Collator
from pokemon_gemma.config import Settings
from pokemon_gemma.dataset import load_records
from pokemon_gemma.train import backward_step, build_model, plan_steps, step_indices


def main(model_dir: str, dataset: str, batch_size: int, grad_accum: int, out: str) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    s = Settings(
        model_name=model_dir,
        dataset_path=dataset,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lora_dropout=0.0,
        seed=3,
    )
    torch.manual_seed(0)
    model, processor = build_model(s)
    records = load_records(dataset)
    collator = Collator(processor, s.max_seq_length)
    plan = plan_steps(len(records), s, accelerator.num_processes)
    micro = [
        collator([records[i] for i in idx]) for idx in step_indices(plan, s, 0, len(records), accelerator.process_index)
    ]
    model = accelerator.prepare(model)
    backward_step(accelerator, model, micro)
    grads = {
        n: p.grad.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad
    }
    if accelerator.is_main_process:
        torch.save(grads, out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
