"""Compile a RASP program with tracr into a model directory ``hap`` can load (``--model DIR``).

A build step, not a run-time dependency: it needs ``tracr-pypi`` (which pulls jax and haiku) and
runs in an environment of its own, e.g.

    python -m venv .venv-tracr && .venv-tracr/bin/pip install tracr-pypi safetensors
    .venv-tracr/bin/python tools/compile_tracr.py --program reverse --out hap/tracr_programs/reverse

``--program all`` rebuilds every shipped program into ``hap/tracr_programs/``. A program of your own:
``--program mymodule:make_program`` where ``make_program()`` returns ``(rasp_program, vocab,
max_seq_len, causal)``.

The directory holds

* ``config.json``: format ``hap-tracr/1``, layers, heads, widths, input and output vocabularies
  (``output_vocab`` is null for a numerical output, which is one residual dimension), BOS and pad
  tokens, the maximum length, causal or not, the residual labels and the command that built it;
* ``weights.safetensors``: the compiled weights, named as ``hap.models.tracr`` reads them;
* ``examples.json``: inputs and the outputs tracr's own compiled model gives (the loader's tests check
  the torch forward against them, so no jax is needed to test);
* ``ground_truth.json``: the true circuit as edge names of hap's graph: the residual labels each
  component writes and reads, read off the non-zero rows of tracr's parameter arrays
  (``hap.models.tracr.true_edges`` applies the same rule to the loaded torch model; the tests check
  they agree, which checks export and loading).
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tracr.compiler import compiling, lib
from tracr.rasp import rasp

BOS, PAD = "BOS", "PAD"
SHIPPED = ("reverse", "sort", "hist", "xproportion", "frac_prevs",  # the first five: 1 to 3 layers
           "shift_by", "pair_balance", "count", "count_less_freq", "detect_pattern",  # small, from tracr's library
           "sort_freq", "shuffle_dyck", "shuffle_dyck2", "sort_reversed")  # 5 to 8 layers deep


def shipped_program(name: str):
    """(program, vocab, max_seq_len, causal) of a shipped program."""
    if name == "reverse":  # the Edge Pruning and ACDC papers' `reverse`
        return lib.make_reverse(rasp.tokens), {"a", "b", "c"}, 5, False
    if name == "sort":
        return lib.make_sort(rasp.tokens, rasp.tokens, max_seq_len=5, min_key=1), {1, 2, 3, 4, 5}, 5, False
    if name == "hist":
        return lib.make_hist(), {"a", "b", "c"}, 5, False
    if name == "xproportion":  # ACDC's `xproportion`: the fraction of x so far, causal
        return lib.make_frac_prevs(rasp.tokens == "x"), {"w", "x", "y", "z"}, 5, True
    if name == "frac_prevs":  # the fraction of a or b so far, non-causal
        bools = rasp.Map(lambda token: token in {"a", "b"}, rasp.tokens)
        return lib.make_frac_prevs(bools), {"a", "b", "c", "d"}, 5, False
    if name == "shift_by":  # one head whose selector reads positions only; position 1 has no value (None)
        return lib.shift_by(1, rasp.tokens), {"a", "b", "c"}, 5, False
    if name == "pair_balance":  # the fraction of "(" so far less that of ")": two numerical means subtracted
        return lib.make_pair_balance(rasp.tokens, "(", ")"), {"(", ")", "x"}, 5, True
    if name == "count":  # how many a's in the input: a selector width on a token comparison
        return lib.make_count(rasp.tokens, "a"), {"a", "b", "c"}, 5, False
    if name == "count_less_freq":  # how many tokens are rarer than 2 occurrences: a histogram feeding a count
        return lib.make_count_less_freq(2), {"a", "b", "c"}, 5, False
    if name == "detect_pattern":  # whether "abc" ends at each position: shifted copies combined by MLPs
        return lib.detect_pattern(rasp.tokens, "abc"), {"a", "b", "c"}, 5, False
    if name == "sort_freq":  # tokens by decreasing frequency: a histogram, a key made unique, a sort
        return lib.make_sort_freq(max_seq_len=5), {"a", "b", "c"}, 5, False
    if name == "shuffle_dyck":  # balanced parentheses, one pair type
        return lib.make_shuffle_dyck(["()"]), {"(", ")", "x"}, 6, False
    if name == "shuffle_dyck2":  # balanced parentheses, two pair types
        return lib.make_shuffle_dyck2(), {"(", ")", "{", "}", "x"}, 6, False
    if name == "sort_reversed":  # ours: sort the reversed input by the input's tokens (reverse feeding a sort)
        reversed_tokens = lib.make_reverse(rasp.tokens)
        return lib.make_sort(reversed_tokens, rasp.tokens, max_seq_len=5, min_key=1), {1, 2, 3, 4, 5}, 5, False
    raise SystemExit(f"unknown program {name!r}; shipped: {', '.join(SHIPPED)}, or module:function")


def user_program(spec: str):
    module_name, _, function = spec.partition(":")
    return getattr(importlib.import_module(module_name), function)()


def _array(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def export(compiled, name: str, sink: str, max_seq_len: int, causal: bool, command: str) -> tuple[dict, dict]:
    """(config, weights) of a compiled model in hap's layout; ``sink`` is the output SOp's label."""
    params = {key: {p: _array(v) for p, v in value.items()} for key, value in compiled.params.items()}
    config_t = compiled.model_config
    labels = list(compiled.residual_labels)
    input_map = compiled.input_encoder.encoding_map
    input_vocab = [token for token, _ in sorted(input_map.items(), key=lambda kv: kv[1])]
    output_encoder = getattr(compiled.output_encoder, "encoding_map", None) and compiled.output_encoder
    weights = {"token_embed": params["token_embed"]["embeddings"], "pos_embed": params["pos_embed"]["embeddings"]}
    for layer in range(config_t.num_layers):
        prefix = f"transformer/layer_{layer}"
        for ours, theirs in (("q", "attn/query"), ("k", "attn/key"), ("v", "attn/value"), ("o", "attn/linear"),
                             ("mlp_in", "mlp/linear_1"), ("mlp_out", "mlp/linear_2")):
            weights[f"layers.{layer}.{ours}.weight"] = params[f"{prefix}/{theirs}"]["w"]
            weights[f"layers.{layer}.{ours}.bias"] = params[f"{prefix}/{theirs}"]["b"]
    if output_encoder is not None:  # categorical: one column per output value, in the output encoder's order
        output_map = output_encoder.encoding_map
        output_vocab = [value for value, _ in sorted(output_map.items(), key=lambda kv: kv[1])]
        unembed = np.zeros((len(labels), len(output_vocab)), dtype=np.float32)
        for value, column in output_map.items():
            unembed[labels.index(f"{sink}:{value}"), column] = 1.0
    else:  # numerical: the output SOp's one dimension
        output_vocab = None
        unembed = np.zeros((len(labels), 1), dtype=np.float32)
        unembed[labels.index(sink), 0] = 1.0
    weights["unembed"] = unembed
    config = {
        "format": "hap-tracr/1",
        "program": name,
        "n_layers": config_t.num_layers,
        "n_heads": config_t.num_heads,
        "d_model": len(labels),
        "head_dim": config_t.key_size,
        "mlp_width": config_t.mlp_hidden_size,
        "causal": causal,
        "max_seq_len": max_seq_len,
        "bos": BOS,
        "pad": PAD,
        "input_vocab": [str(token) for token in input_vocab],
        "output_vocab": None if output_vocab is None else [str(value) for value in output_vocab],
        "output_label": sink,
        "residual_labels": labels,
        "compiled_with": command,
    }
    return config, weights


NO_VALUE_BELOW = 0.5  # hap.models.tracr's: a categorical output this close to 0 everywhere holds no value


def examples(compiled, vocab: set, max_seq_len: int, n: int, seed: int, sink: str) -> list[dict]:
    """Random inputs (every length) and tracr's own outputs for them; None where a categorical output holds
    no value (tracr's decoder takes the argmax of an all-but-zero vector there)."""
    rng = random.Random(seed)
    values = sorted(vocab, key=str)
    numerical = not hasattr(compiled.output_encoder, "encoding_map")
    labels = list(compiled.residual_labels)
    sink_dims = [i for i, label in enumerate(labels) if label.startswith(f"{sink}:")]
    rows = []
    for i in range(n):
        length = 1 + i % max_seq_len
        tokens = [rng.choice(values) for _ in range(length)]
        result = compiled.apply([BOS, *tokens])
        residual = np.asarray(result.transformer_output)[0]
        outputs = []
        for position, value in enumerate(result.decoded[1:], start=1):
            empty = not numerical and residual[position, sink_dims].max() < NO_VALUE_BELOW
            outputs.append(None if value is None or empty else (float(value) if numerical else str(value)))
        rows.append({"input": [str(t) for t in tokens], "output": outputs})
    return rows


def writes_and_reads(config: dict, weights: dict) -> tuple[dict, dict]:
    """Residual labels each source writes and each reader reads, from the compiled weights."""
    labels = config["residual_labels"]
    heads, width = config["n_heads"], config["head_dim"]

    def rows(matrix: np.ndarray) -> set[str]:  # [D, *] -> the labels of non-zero rows
        return {labels[i] for i in np.nonzero(np.abs(matrix).sum(axis=1))[0]}

    writes = {"input": rows(weights["token_embed"].T) | rows(weights["pos_embed"].T)}
    reads = {"logits": rows(weights["unembed"])}
    for layer in range(config["n_layers"]):
        o_w = weights[f"layers.{layer}.o.weight"]  # [H*K, D]
        for head in range(heads):
            cols = slice(head * width, (head + 1) * width)
            writes[f"a{layer}.h{head}"] = rows(o_w[cols].T)
            for kind in ("q", "k", "v"):
                reads[f"a{layer}.h{head}<{kind}>"] = rows(weights[f"layers.{layer}.{kind}.weight"][:, cols])
        writes[f"m{layer}"] = rows(weights[f"layers.{layer}.mlp_out.weight"].T) | {
            labels[i] for i in np.nonzero(weights[f"layers.{layer}.mlp_out.bias"])[0]}
        reads[f"m{layer}"] = rows(weights[f"layers.{layer}.mlp_in.weight"])
    return writes, reads


def block_of(name: str, n_layers: int) -> int:
    """The position in the forward pass (hap.graph's block number) of a source or reader."""
    if name == "input":
        return 0
    if name == "logits":
        return 2 * n_layers + 1
    layer = int(name[1:].split(".")[0].split("<")[0])
    return 2 * layer + (1 if name.startswith("a") else 2)


def ground_truth(config: dict, weights: dict) -> list[str]:
    """Edges ``source->reader`` where the reader reads a residual label the source writes, in order."""
    writes, reads = writes_and_reads(config, weights)
    n = config["n_layers"]
    edges = []
    for source, written in writes.items():
        for reader, read in reads.items():
            if block_of(source, n) < block_of(reader, n) and written & read:
                edges.append(f"{source}->{reader}")
    return edges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--program", required=True, help=f"{', '.join(SHIPPED)}, all, or module:function")
    parser.add_argument("--out", help="output directory (default hap/tracr_programs/<program>)")
    parser.add_argument("--n-examples", type=int, default=64)
    args = parser.parse_args()
    names = SHIPPED if args.program == "all" else (args.program,)
    for name in names:
        program, vocab, max_seq_len, causal = (user_program(name) if ":" in name else shipped_program(name))
        label = name.split(":")[-1]
        program = program.named(label) if ":" in name else program
        compiled = compiling.compile_rasp_to_model(program, vocab=vocab, max_seq_len=max_seq_len, causal=causal,
                                                   compiler_bos=BOS, compiler_pad=PAD)
        command = f"python tools/compile_tracr.py --program {name}"
        config, weights = export(compiled, label, program.label, max_seq_len, causal, command)
        out = Path(args.out if args.out and len(names) == 1 else Path("hap/tracr_programs") / label)
        out.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(out / "weights.safetensors"))
        (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        (out / "examples.json").write_text(json.dumps(examples(compiled, vocab, max_seq_len, args.n_examples, 0, program.label)) + "\n")
        truth = ground_truth(config, weights)
        (out / "ground_truth.json").write_text(json.dumps({"program": label, "edges": truth}, indent=1) + "\n")
        print(f"{label}: {config['n_layers']} layers, {config['n_heads']} heads, d_model {config['d_model']}, "
              f"{len(truth)} true edges -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
