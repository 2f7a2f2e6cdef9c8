"""Training settings shared by stock TRL and ours in tests: fp32, no checkpointing, no reporting, no checkpoints."""

CPU_ARGS = dict(
    bf16=False,
    gradient_checkpointing=False,
    per_device_train_batch_size=2,
    max_steps=3,
    logging_steps=1,
    learning_rate=1e-2,
    report_to="none",
    save_strategy="no",
    seed=0,
    disable_tqdm=True,
)
