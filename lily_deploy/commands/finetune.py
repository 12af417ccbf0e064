"""``lily-deploy finetune``: a thin layer over :func:`lily_deploy.training.finetune`."""
import click

from ..core.models import TASKS
from .options import data_column_options, make_config

# encoders: batch, sample; causal LMs: prompt, causal, token, batch (the config checks which the model takes)
ROUTING_CHOICES = ("batch", "sample", "prompt", "causal", "token")


def _targets(ctx, param, value):
    """``query,value`` -> a list; the config says what an empty list means."""
    if value is None:
        return None
    return [v.strip() for v in str(value).split(",") if v.strip()]


@click.command("finetune")
@click.option("--model", "model", required=True, metavar="NAME_OR_DIR",
              help="Base model: a local Hugging Face folder, 'minilm' (packaged), or timm:NAME.")
@click.option("--task", type=click.Choice(TASKS), default=None,
              help="What the model learns (default: read from the model; causal-lm for *ForCausalLM).")
@click.option("--train", required=True, type=click.Path(),
              help="Training data: .tsv/.csv/.jsonl, or an image folder tree; causal LMs: JSONL with "
                   "prompt/response (loss on the response) or text fields.")
@click.option("--val", required=True, type=click.Path(),
              help="Validation data (same format); the best checkpoint is kept by its accuracy (causal LMs: "
                   "response-token accuracy).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder: the best adapter, train_log.jsonl, checkpoints/.")
@click.option("--method", type=click.Choice(["lily", "lora"]), default="lily", show_default=True,
              help="lily, or a PEFT LoRA baseline at the matched trainable-parameter count.")
@click.option("--rank", default=16, show_default=True, help="Lily rank r (LP output size, HP rows).")
@click.option("--lp-stride", default=2, show_default=True, help="Adjacent layers sharing one LP.")
@click.option("--num-hp", default=4, show_default=True, help="HPs per pool (experts; one pool per target type).")
@click.option("--scale", default=1.0, show_default=True, help="Lily scaling s in y = W0 x + s h B~.")
@click.option("--targets", callback=_targets, default=None, metavar="A,B",
              help="Linear modules to adapt by name suffix (default: PEFT's for the model type, e.g. query,value; "
                   "Llama-family decoders: q/k/v/o_proj, gate/up/down_proj).")
@click.option("--lora-rank", type=int, default=None, help="LoRA rank (default: matched to Lily's parameter count).")
@click.option("--epochs", type=float, default=3.0, show_default=True, help="Epochs (--max-steps wins).")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps in all.")
@click.option("--batch-size", default=32, show_default=True, help="Global batch per forward pass (split across DDP ranks).")
@click.option("--grad-accum", default=1, show_default=True, help="Forward passes per optimizer step.")
@click.option("--lr", default=3e-3, show_default=True, help="Peak learning rate (adapter and head).")
@click.option("--weight-decay", default=0.0, show_default=True, help="AdamW weight decay (matrices only).")
@click.option("--warmup", default=0.06, show_default=True, help="Warm-up: a fraction of the steps (< 1) or a number of steps.")
@click.option("--max-grad-norm", default=1.0, show_default=True, help="Gradient clipping (0: off).")
@click.option("--max-length", default=128, show_default=True, help="Token limit per text.")
@click.option("--seed", default=0, show_default=True, help="Seed for initialisation, data order and dropout.")
@click.option("--eval-every", type=int, default=None, help="Evaluate every N steps (default: each epoch, and at the end).")
@click.option("--save-every", default=100, show_default=True, help="Write checkpoints/last every N steps (and at each eval).")
@click.option("--routing", type=click.Choice(ROUTING_CHOICES), default=None,
              help="Encoders (default sample): sample, per sample, batch-invariant (as export deploys it); "
                   "batch, PEFT's mixing over the whole (local) batch. Causal LMs (default prompt): prompt, the mean over "
                   "the prompt; causal, the running mean; token; or batch for comparison.")
@click.option("--train-size", type=int, default=None, help="Use a seeded random subset of this many training rows.")
@click.option("--val-size", type=int, default=None, help="Use a seeded random subset of this many validation rows.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--resume", is_flag=True, help="Continue the run in -o from checkpoints/last.")
@click.option("--overwrite", is_flag=True, help="Clear a non-empty -o folder and start over.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@data_column_options
def command(no_progress, max_grad_norm, **values):
    """Fine-tune --model with Lily (or LoRA) on --train; keep the best adapter by --val accuracy in -o.

    The output folder is a PEFT adapter (loadable by PeftModel.from_pretrained and by every
    lily-deploy command) plus lily_deploy.json (labels, routing), train_log.jsonl and
    checkpoints/last for --resume. Under `torchrun --nproc_per_node N lily-deploy finetune ...`
    it trains with DDP; --batch-size is the global batch. With --routing batch each process
    mixes over its own local batch (results depend on N); the other routings do not.
    A causal LM learns the responses of prompt/response rows and deploys with the routing it
    trained with (lily_deploy.json records it).
    """
    from ..training import FinetuneConfig, finetune

    config = make_config(FinetuneConfig, progress=not no_progress, max_grad_norm=max_grad_norm or None, **values)
    try:
        result = finetune(config)
    except KeyboardInterrupt:  # the library has said where the checkpoint is; it is kept on purpose
        click.get_current_context().exit(130)
    if result.world_size == 1 or _is_main():
        acc = "-" if result.best_val_accuracy is None else f"{result.best_val_accuracy:.4f}"
        metric = "response-token accuracy" if result.task == "causal-lm" else "accuracy"
        click.echo(f"{result.output_dir}: {result.method} adapter, best val {metric} {acc} at step "
                   f"{result.best_step} of {result.steps}, {result.trainable_params:,} trainable parameters, "
                   f"{result.samples_per_s:.1f} samples/s")


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
