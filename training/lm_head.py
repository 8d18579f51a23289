"""The LM head in training, one of two (config `lm_head`; `auto`, the default, is `liger` where Liger is applied on
CUDA and `trl` elsewhere: training.backends.resolve_lm_head):

- `trl`: TRL's SFTTrainer trains through its own fused LM head (`trl.trainer.utils.add_fused_lm_head`,
  TRL >= 1.15). It projects only the positions that have a label, tile by tile, never materialising the logits, and
  its backward recomputes each tile: three vocab-sized products per labelled token.
- `liger`: Liger's fused linear cross-entropy (patched into the model's forward by `training.backends.apply_liger`),
  given only the labelled positions (`logits_to_keep`, with the labels pre-shifted to match). It computes the input
  gradient during the forward: two vocab-sized products per labelled token. Needs Liger applied (CUDA). On the CPU,
  where Liger does not run, the same call goes through transformers' own loss on the kept positions (exact, and how
  the tests check it). On an H100 it ran full 2B rows 6% faster than TRL's head, and no slowdown showed on chat
  data (docs/benchmarks.md, 2026-12-06, fifth lease).

Both give the same loss, normalised the same way (over `num_items_in_batch`, the labelled tokens of the whole step).
Evaluation, other objectives (a custom loss, label smoothing, DFT) and a micro-batch without labels use TRL's head.
SFTTrainer logs entropy, mean token accuracy and the tokens seen from its head. With `liger` the tokens seen
(`num_tokens`) are logged the same way, and on CUDA Liger's forward returns the labelled positions' top-1 accuracy,
logged as `mean_token_accuracy` (summed over the ranks as SFTTrainer sums its own); entropy is not logged.
"""

from __future__ import annotations

IGNORE = -100


def shifted_labels(inputs: dict):
    """The label each position predicts (position t predicts token t + 1), IGNORE where none."""
    import torch.nn.functional as F

    shift = inputs.get("shift_labels")
    return F.pad(inputs["labels"], (0, 1), value=IGNORE)[..., 1:] if shift is None else shift


def labelled_positions_loss(model, inputs: dict, num_items_in_batch=None, token_accuracy: bool = False):
    """The model's loss computed only at positions whose next token has a label: (loss, outputs). token_accuracy:
    ask Liger's forward for those positions' top-1 accuracy too (`outputs.token_accuracy`; only where Liger runs)."""
    labels = inputs["labels"]
    shift = shifted_labels(inputs)
    keep = (shift != IGNORE).any(dim=0).nonzero().squeeze(1)  # the union over the rows (padding-free: one row)
    kwargs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
    if token_accuracy:
        kwargs["return_token_accuracy"] = True
    outputs = model(**kwargs, labels=labels, shift_labels=shift[:, keep].contiguous(), logits_to_keep=keep,
                    num_items_in_batch=num_items_in_batch, use_cache=False)
    return outputs.loss, outputs


def trainer_class(lm_head: str, token_accuracy: bool = False):
    """The SFTTrainer class that trains with this LM head. token_accuracy (`liger`, where Liger runs: CUDA): log
    Liger's top-1 accuracy on the labelled positions as `mean_token_accuracy`, the metric SFTTrainer logs."""
    from trl import SFTTrainer

    if lm_head == "trl":
        return SFTTrainer
    if lm_head != "liger":  # "auto" is resolved by the backend (training.backends.resolve_lm_head) before this
        raise ValueError(f"lm_head must be 'trl' or 'liger' here, not {lm_head!r}")

    class LabelledLigerSFTTrainer(SFTTrainer):
        """SFTTrainer whose training loss is Liger's fused cross-entropy on the labelled positions only."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # SFTTrainer's own path where this one would differ: evaluation (Liger's forward would materialise
            # logits), other objectives (a custom loss, label smoothing, DFT), a micro-batch without any label
            other_objective = (self.compute_loss_func is not None or self.label_smoother is not None
                               or self.args.loss_type != "nll")
            if not model.training or other_objective or not bool((inputs["labels"] != IGNORE).any()):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs = {**inputs, "shift_labels": shifted_labels(inputs)}  # once: for the loss and for the metrics
            loss, outputs = labelled_positions_loss(model, inputs, num_items_in_batch, token_accuracy)
            self.log_head_metrics(inputs, getattr(outputs, "token_accuracy", None))
            # as Trainer.compute_loss: num_items_in_batch counts every rank's tokens, and DDP averages gradients
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

        def log_head_metrics(self, inputs, accuracy) -> None:
            """What SFTTrainer logs from its own head, as it does: the tokens seen (`num_tokens`) and, where Liger's
            forward returned it, the top-1 accuracy over the labelled positions (`mean_token_accuracy`), each
            summed over the ranks in one gather."""
            import torch

            labelled = (shifted_labels(inputs) != IGNORE).sum().float()
            ids = inputs["input_ids"]
            tokens = inputs["attention_mask"].sum() if "attention_mask" in inputs else torch.tensor(ids.numel())
            correct = accuracy.detach().float() * labelled if accuracy is not None else torch.zeros_like(labelled)
            local = torch.stack([correct, labelled, tokens.to(labelled)]).reshape(1, 3)
            total = self.accelerator.gather_for_metrics(local).sum(dim=0).tolist()
            self._total_train_tokens += int(total[2]) // getattr(self, "_tp_size", 1)
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            if accuracy is not None:
                self._metrics["train"]["mean_token_accuracy"].append(total[0] / total[1] if total[1] else 0.0)

    return LabelledLigerSFTTrainer
