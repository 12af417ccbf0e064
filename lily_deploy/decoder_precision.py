"""``quantize`` for exported Lily decoders: FP16, INT8 (Q/DQ) and INT4 weight-only, judged by generation.

A decoder graph (with its KV cache, or ``--no-cache``) is converted as an encoder is, with the
decoder's parts decided on purpose:

* the linear layers' MatMuls (a constant weight) follow the precision; the attention MatMuls
  (``Q K^T``, ``P V``: both inputs activations) stay fp32 under INT8/INT4 (an int8 attention
  product needs its own calibrated softmax range, which is what TensorRT's fused attention
  does, not a Q/DQ pair);
* the Lily LP and router MatMuls follow ``adapter_precision`` (the router's input dimension is
  the rank, below any INT4 block, so INT4 keeps it fp32); the routing softmax, the routing
  state and the mixing (``lily::HPMixState``) stay fp32 under every precision and stay a
  function call with its body, so every runtime still inlines it;
* INT4: onnxruntime's ``MatMulNBitsQuantizer`` (``rtn`` blockwise symmetric by default, ``hqq``
  and ``gptq`` from its own algorithms); ``onnxruntime`` target -> ``MatMulNBits`` nodes,
  ``tensorrt`` target -> blockwise INT4 ``DequantizeLinear`` weights (symmetric, opset 21);
* INT8: ``quantize_static`` on feeds recorded while the fp32 graph generates for the
  calibration prompts (prefill AND decode steps, real KV caches), TensorRT's Q/DQ form.

Every run ends with :class:`DecoderValidation`: greedy tokens of both graphs on held-out prompts
(teacher-forced agreement on the fp32 continuation and whole-sequence match) and the response
(or text) perplexity of both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .calib import qdq
from .core.errors import LilyDeployError

INT4_TARGETS = ("onnxruntime", "tensorrt")
INT4_METHODS = ("rtn", "hqq", "gptq")
ATTENTION_KEY = "attention MatMuls (activation x activation)"
ROUTER_INT4_KEY = "router MatMuls (input dim = rank, below an int4 block)"
LP_TRT_KEY = "LP MatMuls (output dim = rank: TensorRT-RTX has no int4 kernel for it; fp16)"
ORT_ACCURACY_LEVEL = 4  # MatMulNBits on the CPU: int8 dot products on blockwise-quantized activations


def is_decoder(model, meta: dict) -> bool:
    """An exported causal LM: its metadata says so, or it has ``past_key_values.*`` inputs."""
    if meta.get("lily_deploy.task") == "causal-lm":
        return True
    return any(i.name.startswith("past_key_values.") for i in model.graph.input)


# ---------------------------------------------------------------------------------------------
# running a decoder graph: cached (OrtDecoder) or a plain logits graph (full forwards)
# ---------------------------------------------------------------------------------------------

class FullForwardDecoder:
    """A decoder graph without a cache (``export --no-cache``) behind the decoder step interface:
    each step runs the whole sequence so far."""

    backend = "onnxruntime-cpu"

    def __init__(self, path, threads: Optional[int] = None):
        from .runtime.ort import OrtRunner

        self.runner = OrtRunner(path, threads=threads)
        self.name = Path(path).name
        self.max_positions = None
        self.feeds_seen: Optional[list] = None

    def start(self, batch: int):
        from .runtime.decoder import DecoderCache

        return DecoderCache(kv=None, routing={}, length=0)

    def step(self, input_ids, attention_mask, position_ids, cache):
        from .runtime.decoder import DecoderCache

        ids = np.asarray(input_ids, np.int64) if cache.kv is None else \
            np.concatenate([cache.kv[0], np.asarray(input_ids, np.int64)], axis=1)
        pos = np.asarray(position_ids, np.int64) if cache.kv is None else \
            np.concatenate([cache.kv[1], np.asarray(position_ids, np.int64)], axis=1)
        feeds = {"input_ids": ids, "attention_mask": np.asarray(attention_mask, np.int64), "position_ids": pos}
        feeds = {k: v for k, v in feeds.items() if k in self.runner.input_names}
        if self.feeds_seen is not None:
            self.feeds_seen.append(dict(feeds))
        logits = self.runner.infer(feeds, ["logits"])["logits"]
        new = np.shape(input_ids)[1]
        return np.asarray(logits[:, -new:], np.float32), DecoderCache((ids, pos), {}, ids.shape[1])


def open_decoder_graph(path, threads: Optional[int] = None):
    """The step decoder of a decoder graph: cached when it has ``past_key_values.*`` inputs."""
    from .runtime.onnx_io import load_onnx

    model = load_onnx(path, external_data=False)
    if any(i.name.startswith("past_key_values.") for i in model.graph.input):
        from .runtime.decoder_ort import OrtDecoder

        return OrtDecoder(path, threads=threads)
    return FullForwardDecoder(path, threads)


class _Recorder:
    """Wraps a decoder so every graph run's feeds are kept (calibration for INT8/GPTQ)."""

    def __init__(self, decoder):
        self.decoder, self.feeds = decoder, []
        if isinstance(decoder, FullForwardDecoder):
            decoder.feeds_seen = self.feeds
        else:
            run = decoder._run
            decoder._run = lambda f: (self.feeds.append({k: np.array(v) for k, v in f.items()}), run(f))[1]


# ---------------------------------------------------------------------------------------------
# prompts and responses (the JSONL of ``generate``/``finetune``)
# ---------------------------------------------------------------------------------------------

@dataclass
class Rows:
    source: str
    prompts: list  # str or None (a text row)
    responses: list  # str or None
    texts: list  # str or None
    lines: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.lines)


def read_rows(path, size: Optional[int], seed: int, flag: str, exclude: Sequence[int] = ()) -> tuple[Rows, list[int]]:
    """A seeded choice of ``size`` rows of a prompts JSONL (``prompt`` [+ ``response``] or ``text``)."""
    from .calib.readers import choose_rows
    from .core.data import read_prompt_table

    path = Path(path)
    if not path.is_file():
        raise LilyDeployError(f"{flag} {path}: no such file")
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise LilyDeployError(f"{flag} {path}: a decoder takes the prompts JSONL of generate (one object a line "
                              "with 'prompt', and 'response' or 'text' for perplexity)")
    table = read_prompt_table(path)
    chosen = choose_rows(len(table.lines), size, seed, exclude)
    if not chosen:
        raise LilyDeployError(f"{flag} {path}: no rows left (all {len(table.lines)} went to calibration); "
                              "give held-out prompts with --val")
    pick = lambda xs: [xs[i] for i in chosen]  # noqa: E731
    return Rows(path.name, pick(table.prompts), pick(table.responses), pick(table.texts), pick(table.lines)), chosen


def _prompt_of(rows: Rows, i: int) -> str:
    return rows.prompts[i] if rows.prompts[i] is not None else rows.texts[i]


def record_calibration(path, tokenizer, rows: Rows, new_tokens: int, batch_size: int) -> list[dict]:
    """Feeds of every graph run while the fp32 decoder generates ``new_tokens`` for each prompt."""
    from .generation import decode, special_ids

    from .core.data import prompt_ids

    rec = _Recorder(open_decoder_graph(path))
    eos, pad = special_ids(tokenizer)
    ids = [prompt_ids(tokenizer, _prompt_of(rows, i)) for i in range(len(rows))]
    for start in range(0, len(ids), batch_size):
        decode(rec.decoder, ids[start:start + batch_size], new_tokens, None, pad)
    return rec.feeds


# ---------------------------------------------------------------------------------------------
# validation: greedy tokens and perplexity against the fp32 decoder
# ---------------------------------------------------------------------------------------------

@dataclass
class DecoderValidation:
    """The quantized decoder against the fp32 decoder; truthy when within both budgets."""

    source: str
    precision: str
    prompts: int
    new_tokens: int
    agreement: float  # teacher-forced: share of steps where the candidate's argmax is fp32's greedy token
    exact: float  # share of prompts whose free-running greedy continuation is identical
    first_divergence: Optional[int]  # earliest step (0-based) where a free-running continuation differs
    nll_fp32: Optional[float]  # mean NLL per scored token (response or text)
    nll_quant: Optional[float]
    scored_tokens: int
    min_agreement: float  # percent
    max_ppl_increase: float  # percent

    @property
    def ppl_fp32(self) -> Optional[float]:
        return None if self.nll_fp32 is None else math.exp(self.nll_fp32)

    @property
    def ppl_quant(self) -> Optional[float]:
        return None if self.nll_quant is None else math.exp(self.nll_quant)

    @property
    def ppl_increase(self) -> Optional[float]:
        """Perplexity increase, percent (``exp`` of the NLL difference, minus 1)."""
        if self.nll_fp32 is None:
            return None
        return 100.0 * (math.exp(self.nll_quant - self.nll_fp32) - 1.0)

    @property
    def failures(self) -> list[str]:
        out = []
        if 100 * self.agreement < self.min_agreement - 1e-9:
            out.append(f"token agreement {100 * self.agreement:.2f}% < --min-token-agreement {self.min_agreement:g}%")
        if self.ppl_increase is not None and self.ppl_increase > self.max_ppl_increase + 1e-9:
            out.append(f"perplexity +{self.ppl_increase:.2f}% > --max-ppl-increase {self.max_ppl_increase:g}%")
        return out

    def __bool__(self) -> bool:
        return not self.failures

    metric = "generation"

    def lines(self) -> list[str]:
        out = [f"validation against fp32 on {self.source} ({self.prompts} prompts, {self.new_tokens} new tokens):"]
        div = "none" if self.first_divergence is None else f"step {self.first_divergence}"
        out.append(f"  greedy tokens: {100 * self.agreement:.2f}% of steps agree (teacher-forced on fp32's tokens; "
                   f"min {self.min_agreement:g}%), {100 * self.exact:.1f}% of continuations identical, "
                   f"first divergence {div}")
        if self.nll_fp32 is None:
            out.append("  perplexity: no 'response' or 'text' fields, not measured")
        else:
            out.append(f"  perplexity on {self.scored_tokens} tokens: fp32 {self.ppl_fp32:.4g}  {self.precision} "
                       f"{self.ppl_quant:.4g}  ({self.ppl_increase:+.2f}%, max +{self.max_ppl_increase:g}%)")
        out.append("PASSED" if self else "FAILED: " + "; ".join(self.failures))
        return out

    def to_json(self) -> dict:
        return {"data": self.source, "prompts": self.prompts, "new_tokens": self.new_tokens,
                "token_agreement": round(self.agreement, 6), "continuations_identical": round(self.exact, 6),
                "first_divergence": self.first_divergence, "ppl_fp32": self.ppl_fp32, "ppl": self.ppl_quant,
                "ppl_increase_percent": self.ppl_increase, "scored_tokens": self.scored_tokens,
                "min_token_agreement": self.min_agreement, "max_ppl_increase": self.max_ppl_increase,
                "passed": bool(self)}


def _teacher_forced(decoder, ids: list[int], forced: list[int]) -> list[int]:
    """The decoder's argmax at each step when fed ``forced`` (another decoder's greedy tokens)."""
    from .generation import left_pad

    x, mask, pos = left_pad([ids], 0)
    logits, cache = decoder.step(x, mask, pos, decoder.start(1))
    picks = [int(logits[0, -1].argmax())]
    for tok in forced[:-1]:
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        logits, cache = decoder.step(np.array([[tok]], np.int64), mask, pos, cache)
        picks.append(int(logits[0, -1].argmax()))
    return picks


def _nll(decoder, head: list[int], tail: list[int]) -> tuple[float, int]:
    """Summed NLL of ``tail`` after ``head``: the prompt as prefill (so prompt routing sees the prompt
    only), then the response in one step; a text row (no head) scores its tokens after the first."""
    from .generation import left_pad

    if not head:
        head, tail = tail[:1], tail[1:]
    if not tail:
        return 0.0, 0
    x, mask, pos = left_pad([head], 0)
    logits, cache = decoder.step(x, mask, pos, decoder.start(1))
    vocab = logits.shape[-1]  # a tokenizer's added EOS beyond the LM head's vocabulary cannot be scored
    tail = tail[:next((k for k, t in enumerate(tail) if t >= vocab), len(tail))]
    if not tail:
        return 0.0, 0
    steps = [logits[0, -1]]
    if len(tail) > 1:
        mask = np.ones((1, len(head) + len(tail) - 1), np.int64)
        p = np.arange(len(head), len(head) + len(tail) - 1, dtype=np.int64)[None]
        more, _ = decoder.step(np.array([tail[:-1]], np.int64), mask, p, cache)
        steps += list(more[0])
    z = np.stack(steps).astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(tail)), tail].sum()), len(tail)


def validate_decoder(reference, candidate, tokenizer, rows: Rows, precision: str, new_tokens: int,
                     min_agreement: float, max_ppl_increase: float, max_length: int = 512) -> DecoderValidation:
    """Greedy tokens and perplexity of ``candidate`` against ``reference`` (both decoder graphs) on ``rows``."""
    from .core.data import lm_example, prompt_ids
    from .generation import decode, special_ids

    ref, cand = open_decoder_graph(reference), open_decoder_graph(candidate)
    eos, pad = special_ids(tokenizer)
    agree = steps = exact = 0
    first: Optional[int] = None
    nll_r = nll_c = 0.0
    scored = 0
    for i in range(len(rows)):
        ids = prompt_ids(tokenizer, _prompt_of(rows, i))
        (ref_toks,), ref_logits = decode(ref, [ids], new_tokens, None, pad, record_logits=True)
        (cand_toks,), _ = decode(cand, [ids], new_tokens, None, pad)
        if not np.isfinite(np.stack(ref_logits)).all():
            raise LilyDeployError(f"the fp32 graph {reference} gives non-finite logits on prompt {rows.lines[i]}")
        forced = _teacher_forced(cand, ids, ref_toks)
        agree += sum(a == b for a, b in zip(forced, ref_toks))
        steps += len(ref_toks)
        exact += cand_toks == ref_toks
        diverge = next((k for k, (a, b) in enumerate(zip(cand_toks, ref_toks)) if a != b), None)
        if diverge is not None:
            first = diverge if first is None else min(first, diverge)
        target = rows.responses[i] if rows.prompts[i] is not None else rows.texts[i]
        if target:
            full, labels = lm_example(tokenizer, rows.prompts[i], target, max_length)
            head = [t for t, l in zip(full, labels) if l < 0]
            tail = full[len(head):]
            ref_nll, n = _nll(ref, head, tail)
            value, _ = _nll(cand, head, tail)
            if not math.isfinite(value):
                raise LilyDeployError(f"the {precision} graph gives non-finite logits on {rows.source} "
                                      f"line {rows.lines[i]}: keep the overflowing nodes fp32 (--exclude-nodes)")
            nll_r, nll_c, scored = nll_r + ref_nll, nll_c + value, scored + n
    return DecoderValidation(rows.source, precision, len(rows), new_tokens, agree / max(steps, 1), exact / len(rows),
                             first, nll_r / scored if scored else None, nll_c / scored if scored else None, scored,
                             min_agreement, max_ppl_increase)


# ---------------------------------------------------------------------------------------------
# the conversion
# ---------------------------------------------------------------------------------------------

def weight_matmuls(model) -> dict[str, tuple[int, int]]:
    """MatMul nodes whose second input is a 2-D constant weight: name -> (K, N)."""
    shapes = {t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer}
    return {n.name: shapes[n.input[1]] for n in model.graph.node
            if n.op_type == "MatMul" and len(shapes.get(n.input[1], ())) == 2}


def decoder_plan(model, sites, precision: str, adapter: str, user: list[str], keep_sensitive: bool = True,
                 int4_target: str = "onnxruntime") -> qdq.Plan:
    """What a decoder conversion converts and keeps fp32 (see the module's docstring)."""
    weights = weight_matmuls(model)
    attention = [n.name for n in model.graph.node if n.op_type in qdq.QUANTIZED_OP_TYPES and n.name not in weights]
    if precision == "fp16":
        return qdq.fp16_plan(model, sites, adapter, user, keep_sensitive=keep_sensitive)
    plan = qdq.int8_plan(model, sites, "int8" if adapter != "fp32" else "fp32", user)
    plan.precision, plan.adapter_precision = precision, adapter
    taken = set(plan.excluded())
    extra = {ATTENTION_KEY: [n for n in attention if n not in taken]}
    if precision == "int4":
        extra[ROUTER_INT4_KEY] = [s.router for s in sites if s.router and s.router not in taken]
        if int4_target == "tensorrt":
            extra[LP_TRT_KEY] = list(dict.fromkeys(s.lp for s in sites if s.lp and s.lp not in taken))
    plan.kept_fp32.update({k: v for k, v in extra.items() if v})
    return plan


def check_block_size(model, plan: qdq.Plan, block_size: int) -> int:
    """Every MatMul INT4 will quantize has an input dim ``block_size`` divides; returns how many there are."""
    kept = set(plan.excluded())
    targets = {n: kn for n, kn in weight_matmuls(model).items() if n not in kept}
    for name, (k, n) in targets.items():
        if k % block_size:
            fits = [b for b in (16, 32, 64, 128, 256) if k % b == 0]
            hint = f" (block sizes that divide it: {', '.join(map(str, fits))})" if fits else ""
            raise LilyDeployError(f"--block-size {block_size} does not divide the input dimension {k} of MatMul "
                                  f"{name} (weight {k}x{n}){hint}")
    if not targets:
        raise LilyDeployError("nothing to quantize to int4: every weight MatMul is kept fp32")
    return len(targets)


def check_embedding_block(model, block_size: int) -> None:
    """The embedding's hidden dimension (its blocks' axis) must be a multiple of ``block_size``."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for n in model.graph.node:
        dims = shapes.get(n.input[0]) if n.op_type == "Gather" else None
        if dims and len(dims) == 2 and dims[1] % block_size:
            raise LilyDeployError(f"--block-size {block_size} does not divide the hidden dimension {dims[1]} of the "
                                  f"embedding {n.input[0]} ({dims[0]}x{dims[1]}) that --int4-embedding quantizes")


def convert_int4(model, plan: qdq.Plan, block_size: int, target: str, method: str, reader=None,
                 embedding: bool = False):
    """INT4 weight-only with onnxruntime's ``MatMulNBitsQuantizer``: ``MatMulNBits`` (onnxruntime) or
    blockwise symmetric INT4 ``DequantizeLinear`` weights (tensorrt); ``embedding`` (onnxruntime, rtn):
    the token embedding too, as ``GatherBlockQuantized`` (blocks along the hidden dimension)."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    fmt = QuantFormat.QDQ if target == "tensorrt" else QuantFormat.QOperator
    level = ORT_ACCURACY_LEVEL if target == "onnxruntime" else None
    if method == "rtn":
        ops = {"op_types_to_quantize": ("MatMul", "Gather"), "quant_axes": (("MatMul", 0), ("Gather", 1))} \
            if embedding else {"op_types_to_quantize": ("MatMul",)}
        algo = mnb.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, quant_format=fmt,
                                                accuracy_level=level, **ops)
    elif method == "hqq":
        algo = mnb.HQQWeightOnlyQuantConfig(block_size=block_size, bits=4, quant_format=fmt,
                                            op_types_to_quantize=("MatMul",))
    else:
        algo = mnb.GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, block_size=block_size, quant_format=fmt,
                                             op_types_to_quantize=("MatMul",))
    work = onnx.ModelProto()
    work.CopyFrom(model)
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.ERROR)  # "opset under 21 ... forced to 21": said in the metadata instead
    try:
        quantizer = mnb.MatMulNBitsQuantizer(work, bits=4, block_size=block_size, is_symmetric=True,
                                             accuracy_level=level, nodes_to_exclude=plan.excluded(),
                                             quant_format=fmt, algo_config=algo)
        quantizer.process()
    finally:
        logger.setLevel(level)
    out = quantizer.model.model
    if target == "tensorrt":
        _share_dequantize(out)
    return out


def _share_dequantize(model) -> None:
    """One DequantizeLinear per quantized weight: onnxruntime's QDQ path writes one per MatMul, under the
    same output name, for a weight several MatMuls share (a Lily LP serves a group of layers)."""
    seen, keep = set(), []
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.output[0] in seen:
            continue
        seen.update(n.output if n.op_type == "DequantizeLinear" else ())
        keep.append(n)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def count_int4(model) -> int:
    import onnx

    inits = {t.name: t.data_type for t in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized") or
               (n.op_type == "DequantizeLinear" and inits.get(n.input[0]) == onnx.TensorProto.INT4))


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------

def _decoder_rows(config, result) -> tuple[Optional[Rows], Rows]:
    """Calibration rows (int8, gptq) and validation rows: ``val``, else the calibration file's other rows."""
    calib_rows, used = None, []
    needs_calib = config.precision == "int8" or (config.precision == "int4" and config.int4_method == "gptq")
    if needs_calib:
        if config.calib is None:
            raise LilyDeployError(f"--calib: {config.precision} ({config.int4_method if config.precision == 'int4' else 'Q/DQ'}) "
                                  "of a decoder calibrates on prompts: give the prompts JSONL of generate")
        calib_rows, used = read_rows(config.calib, config.calib_size, config.seed, "--calib")
        result.calib, result.calib_rows = Path(config.calib).name, len(calib_rows)
    if config.val is not None:
        return calib_rows, read_rows(config.val, config.val_size, config.seed, "--val")[0]
    if config.calib is None:
        raise LilyDeployError("--val: a decoder is validated by generation: give held-out prompts (the prompts "
                              "JSONL of generate, with 'response' or 'text' for perplexity)")
    return calib_rows, read_rows(config.calib, config.val_size, config.seed, "--calib", exclude=used)[0]


def _convert(config, inlined, plan: qdq.Plan, calib_feeds, folder: Path, result):
    from .calib.readers import ort_reader
    from .runtime.onnx_io import load_onnx

    if config.precision == "fp16":
        return qdq.convert_fp16(inlined, plan)
    if config.precision == "int4":
        check_block_size(inlined, plan, config.block_size)
        if config.int4_embedding:
            check_embedding_block(inlined, config.block_size)
        out = convert_int4(inlined, plan, config.block_size, config.int4_target, config.int4_method,
                           ort_reader(calib_feeds) if calib_feeds else None, config.int4_embedding)
        result.int8_matmuls = count_int4(out)
        if config.int4_target == "tensorrt":  # TensorRT's weight-only GEMMs take fp16 activations (W4A16)
            out = qdq.convert_fp16(out, qdq.fp16_plan(out, plan.sites, "fp16", plan.excluded_user,
                                                      keep_sensitive=config.keep_sensitive))
        return out
    raw = folder / "quantized.onnx"
    qdq.quantize_int8(inlined, ort_reader(calib_feeds), config.calib_method, plan, str(raw), None, config.int8_target)
    out = load_onnx(raw, external_data=True)
    raw.unlink()
    result.int8_matmuls = len(qdq.count_quantized(out)["int8_matmuls"])
    if not result.int8_matmuls:
        raise LilyDeployError("quantization produced no int8 MatMul; check --exclude-nodes/--exclude-op-types")
    return out


def _summary(config, plan: qdq.Plan, result) -> list[str]:
    if config.precision == "fp16":
        head = "fp16 decoder: fp16 weights and activations; fp32 inputs, outputs, KV cache I/O and routing state"
    elif config.precision == "int8":
        head = (f"int8 decoder (Q/DQ, {config.int8_target} form): {result.int8_matmuls} weight MatMuls int8; "
                f"{config.calib_method} calibration on prefill and decode steps of {result.calib_rows} prompts")
    else:
        form = f"MatMulNBits (onnxruntime, accuracy level {ORT_ACCURACY_LEVEL}), fp32 activations" \
            if config.int4_target == "onnxruntime" else \
            "blockwise INT4 DequantizeLinear weights (TensorRT), fp16 activations"
        emb = " (token embedding included: GatherBlockQuantized)" if config.int4_embedding else ""
        head = (f"int4 weight-only decoder, {config.int4_method}, block {config.block_size}: {result.int8_matmuls} "
                f"MatMuls{emb} as {form}")
    return [head, f"  Lily: LP/router MatMuls {plan.adapter_precision}; routing softmax, state and mixing fp32 "
                  "(lily::HPMixState kept as a function with its body)"]


def decoder_info(config, plan: qdq.Plan, result) -> dict:
    info = {"precision": config.precision, "task": "causal-lm", "adapter_precision": plan.adapter_precision,
            "routing_precision": "fp32 (router softmax, routing state, mixing vector)",
            "kept_fp32": {k: len(v) for k, v in plan.kept_fp32.items()}}
    if config.precision == "int8":
        info.update({"format": "QDQ", "target": config.int8_target, "calib_method": config.calib_method,
                     "calib_prompts": result.calib_rows, "int8_matmuls": result.int8_matmuls,
                     "activations": qdq.ACTIVATION_FORM[config.int8_target], "weights": "int8 symmetric per-channel"})
    elif config.precision == "int4":
        info.update({"format": "MatMulNBits" if config.int4_target == "onnxruntime" else "QDQ int4 blockwise",
                     "target": config.int4_target, "method": config.int4_method, "block_size": config.block_size,
                     "activations": "fp32 (accuracy level 4)" if config.int4_target == "onnxruntime" else "fp16",
                     "symmetric": True, "int4_matmuls": result.int8_matmuls,
                     "embedding": "int4 (GatherBlockQuantized)" if config.int4_embedding else "fp32" if
                     config.int4_target == "onnxruntime" else "fp16"})
    else:
        info["format"] = "casts"
    return info


def quantize_decoder(config, source, meta: dict, result):
    """Convert the decoder graph ``source`` as ``config`` says, validate by generation, write (see
    :func:`lily_deploy.precision.quantize`); fills and returns ``result``."""
    from .calib.readers import resolve_tokenizer
    from .core.fileio import sha256_file
    from .runtime.onnx_io import set_metadata, staged_onnx

    model_path, output = Path(config.model_path), Path(config.output)
    inlined, sites = qdq.inline_functions(source)
    user = qdq.resolve_exclusions(inlined, config.exclude_nodes, config.exclude_op_types)
    plan = decoder_plan(inlined, sites, config.precision, config.adapter, user, config.keep_sensitive,
                        config.int4_target)
    result.adapter_precision, result.kept_fp32, result.adapter_layers = plan.adapter_precision, plan.kept_fp32, len(sites)
    tokenizer = resolve_tokenizer(config.tokenizer, config.model, meta.get("lily_deploy.base_model"),
                                  str(model_path)).tokenizer
    calib_rows, val_rows = _decoder_rows(config, result)
    feeds = record_calibration(model_path, tokenizer, calib_rows, config.new_tokens, config.batch_size) \
        if calib_rows is not None else None
    with staged_onnx(output) as staged:
        converted = _convert(config, inlined, plan, feeds, staged.folder, result)
        info = {**decoder_info(config, plan, result), "source_onnx_sha256": sha256_file(model_path)}
        new_meta = {**meta, "lily_deploy.precision": config.precision, "lily_deploy.excluded_nodes": plan.excluded()}
        set_metadata(converted, {**new_meta, "lily_deploy.quantization": info})
        staged.write(converted)
        result.validation = validate_decoder(model_path, staged.path, tokenizer, val_rows, config.precision,
                                             config.new_tokens, config.min_token_agreement, config.max_ppl_increase)
        info["validation"] = result.validation.to_json()
        set_metadata(converted, {**new_meta, "lily_deploy.quantization": info})
        staged.write(converted)
        if result.passed or config.keep_on_failure:
            staged.commit()
            result.written = True
    result.summary = _summary(config, plan, result)
    return result
