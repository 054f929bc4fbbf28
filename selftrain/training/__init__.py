"""The one place that builds TrainingArguments / TRL configs and runs a trainer.

Every training method of the toolkit goes through here, so precision, device, seed, logging,
experiment tracking (``run.report_to``), data order and LoRA adapters behave the same in all:

- ``lm.lm_train``: causal or masked LM on packed blocks (``transformers.Trainer``), resumable;
- ``sft.sft_train``: completion-only supervised fine-tuning (TRL ``SFTTrainer``);
- ``grpo.grpo_train``: GRPO with an environment's rollouts and reward functions (TRL ``GRPOTrainer``);
- ``dpo.dpo_train``: DPO on preference pairs (TRL ``DPOTrainer``).

Each takes the model, its data, typed options (with ``adapter``: LoRA or null) and the same keywords:
``out_dir`` (the trainer's scratch folder, inside the stage directory), ``seed``, ``log`` /
``stage_key`` (the run's metrics log) and ``report_to``; LM, SFT and DPO also take ``order`` (an
explicit order of the training rows; None is the trainer's own shuffle), while GRPO's data is what
its environment plays. Each returns the trained model as a plain ``transformers`` model (a LoRA
adapter is merged) and its metrics or per-step records.

Layering: stages import this package; it imports modeling, config and errors, never stages or
evaluation. TRL is imported only by the modules that use it.
"""
