"""``lily-deploy generate``: a thin layer over :func:`lily_deploy.generation.generate`."""
import json
import sys

import click

from .options import base_option, make_config, usage_errors

FLAGS = {"prompts": "--prompt", "prompts_file": "--prompts", "model": "MODEL"}


@click.command("generate")
@click.argument("model", metavar="MODEL")
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable).")
@click.option("--prompts", "prompts_file", type=click.Path(), default=None,
              help="JSONL of prompts: one object per line with a 'prompt' field.")
@click.option("--max-new-tokens", default=32, show_default=True, help="Tokens to generate per prompt.")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default=None,
              help="torch for an adapter or checkpoint, onnxruntime for an exported decoder, tensorrt for its "
                   "engine (GPU) (default: by MODEL).")
@click.option("--batch-size", default=8, show_default=True, help="Prompts per batch (left-padded).")
@click.option("--routing", default=None, help="torch: route the adapter's layers by prompt, causal or token "
                                              "(default: as trained).")
@click.option("--temperature", default=0.0, show_default=True, help="0: greedy; above: seeded sampling.")
@click.option("--top-k", default=0, show_default=True, help="Sample from the k likeliest tokens (0: all).")
@click.option("--top-p", default=1.0, show_default=True, help="Sample from the smallest set reaching this mass.")
@click.option("--seed", default=0, show_default=True, help="Seed of the sampler.")
@click.option("--tokenizer", default=None, help="Tokenizer folder for an exported decoder (default: its base model).")
@click.option("--allow-inconsistent-routing", is_flag=True,
              help="Generate with batch or sample routing anyway (for comparison: not exact under a KV cache).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per prompt: prompt, tokens, text.")
@base_option
def command(model, prompts, prompts_file, max_new_tokens, backend, batch_size, routing, temperature, top_k, top_p,
            seed, tokenizer, allow_inconsistent_routing, as_json, base):
    """Generate text from MODEL (adapter folder, deploy checkpoint, exported decoder .onnx or its engine .plan).

    Greedy by default; prompts are batched with left padding. Routing must be exact under a
    cache (prompt, causal or token): batch and sample routing are refused unless
    --allow-inconsistent-routing.
    """
    from ..generation import GenerateConfig, generate
    from ..runtime import kind_of

    backend = backend or {"onnx": "onnxruntime", "engine": "tensorrt"}.get(kind_of(model), "torch")
    config = make_config(GenerateConfig, flags=FLAGS, model=model, prompts=prompts, prompts_file=prompts_file,
                         max_new_tokens=max_new_tokens, backend=backend, batch_size=batch_size, routing=routing,
                         temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, base=base,
                         tokenizer=tokenizer, allow_inconsistent_routing=allow_inconsistent_routing)
    one_prompt = not as_json and len(prompts) == 1 and not prompts_file
    stream = _streamer(prompts[0]) if one_prompt else None  # one prompt: its tokens as they come
    with usage_errors(FLAGS):
        result = generate(config, on_token=stream)
    if as_json:
        for row in result.rows:
            click.echo(json.dumps(row.to_json()))
    elif stream is not None:
        click.echo("")
    else:
        for row in result.rows:
            click.echo(f"{row.prompt}{'' if row.text.startswith(' ') else ' '}{row.text}")


def _streamer(prompt: str):
    """Print the prompt, then each token as it is generated."""
    started = []

    def on_token(index, token, new_text):
        if not started:
            started.append(True)
            sys.stdout.write(prompt + " ")
        sys.stdout.write(new_text)
        sys.stdout.flush()

    return on_token
