"""Training steps written outside ``project/``: each runs through the CLI by its class_path (README: Write your own LightningModule)."""
