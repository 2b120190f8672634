"""Training: stage 1 (pretrain), stage 2 (finetune: E-step cache + M-step), checkpoints."""
