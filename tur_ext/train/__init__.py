"""Training: configs, the trainer, checkpoints, EMA, the LR schedule, evaluation.

    from tur_ext.train import load_config, Trainer
    cfg = load_config("configs/quickstart.yaml", ["train.steps=100"])
    with Trainer(cfg) as trainer:
        summary = trainer.train()
"""
from .checkpoint import (CheckpointManager, atomic_torch_save, build_model_from_checkpoint, find_checkpoint,
                         load_checkpoint, save_checkpoint)
from .config import ConfigError, apply_overrides, load_config, parse_value, validate
from .ema import ModelEMA
from .evaluate import evaluate, evaluate_checkpoint
from .schedule import CosineRestartSchedule, WarmupCosineSchedule, cosine_restart_factor, warmup_cosine_factor
from .trainer import NonFiniteLossError, Trainer, train_and_evaluate

__all__ = [
    "CheckpointManager",
    "ConfigError",
    "CosineRestartSchedule",
    "ModelEMA",
    "NonFiniteLossError",
    "Trainer",
    "WarmupCosineSchedule",
    "apply_overrides",
    "atomic_torch_save",
    "build_model_from_checkpoint",
    "cosine_restart_factor",
    "evaluate",
    "evaluate_checkpoint",
    "find_checkpoint",
    "load_checkpoint",
    "load_config",
    "parse_value",
    "save_checkpoint",
    "validate",
    "warmup_cosine_factor",
    "train_and_evaluate",
]
