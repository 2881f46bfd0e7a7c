"""Models compiled from RASP programs by tracr (Lindner et al. 2023), whose circuits are known.

A tracr model directory (written by ``tools/compile_tracr.py``; five ship in ``hap/tracr_programs``)
holds ``config.json`` (format ``hap-tracr/1``), ``weights.safetensors``, ``examples.json`` and
``ground_truth.json``. ``TracrTransformer`` is tracr's architecture in plain torch:

* ``input`` = token embedding + position embedding (position 0, the BOS token, has a zero row);
* every layer: multi-head attention on the residual as it is (no layer norm), softmax over
  ``q k^T / sqrt(head_dim)`` with padding keys masked (and future keys when ``causal``), then a ReLU
  MLP; both add to the residual;
* the output: the residual times ``unembed``, one column per output value (argmax is tracr's
  answer), or one column holding the number for a numerical program.

Residual decomposition (``TracrAdapter``): as GPT-2 without norms. The output bias of an attention
layer is shared equally by its heads; an MLP source includes both of its biases.

Ground truth (``true_edges``): tracr's residual stream is a direct sum of labelled one-hot
dimensions, one block of dimensions per RASP variable, and every component reads and writes whole
variables. A source writes the dimensions where its output map (embedding rows, a head's rows of
the output projection, an MLP's second layer and bias) is non-zero; a reader reads the dimensions
where its input map (a head's query, key or value columns, an MLP's first layer, the unembedding)
is non-zero. An edge is in the true circuit when the reader reads a dimension the source writes.
Read this under zero ablation: an edge that carries only positions or the constant ``one``
direction carries the same values in a clean and a corrupted run of equal length, so interchange
ablation cannot see it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import Tensor, nn
from transformers import PreTrainedTokenizerFast

from ..errors import ModelNotFoundError
from ..settings import PROGRAMS_DIR, TRACR_FORMAT, is_tracr_dir, shipped_programs, tracr_dir  # noqa: F401 (re-exported)
from .adapter import AttentionWeights, Layout, ModelAdapter, RunContext

REBUILD = "rebuild it with `python tools/compile_tracr.py` (see its docstring)"


@dataclass(frozen=True)
class TracrConfig:
    """The shape and vocabularies of a compiled program (``config.json``)."""

    program: str
    n_layers: int
    n_heads: int
    d_model: int
    head_dim: int
    mlp_width: int
    causal: bool
    max_seq_len: int
    bos: str
    pad: str
    input_vocab: list[str]
    output_vocab: list[str] | None  # None: a numerical output (one column)
    output_label: str
    residual_labels: list[str]
    compiled_with: str = ""

    @property
    def numerical(self) -> bool:
        return self.output_vocab is None

    @property
    def n_outputs(self) -> int:
        return 1 if self.output_vocab is None else len(self.output_vocab)

    @classmethod
    def read(cls, path: Path) -> TracrConfig:
        """Read and check ``config.json``; a wrong or incomplete file raises ``ModelNotFoundError``."""
        try:
            raw: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ModelNotFoundError(f"{path}: not a readable tracr config ({error}); {REBUILD}") from error
        if raw.get("format") != TRACR_FORMAT:
            raise ModelNotFoundError(f"{path}: format {raw.get('format')!r}, expected {TRACR_FORMAT!r}; {REBUILD}")
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in raw and name != "compiled_with"]
        if missing:
            raise ModelNotFoundError(f"{path}: missing {', '.join(missing)}; {REBUILD}")
        return cls(**{name: raw[name] for name in names if name in raw})


@dataclass
class TracrOutput:
    logits: Tensor  # [B, T, n_outputs]


class TracrLayer(nn.Module):
    """One tracr layer: multi-head attention, then a ReLU MLP, each added to the residual."""

    def __init__(self, config: TracrConfig) -> None:
        super().__init__()
        width = config.n_heads * config.head_dim
        self.q = nn.Linear(config.d_model, width)
        self.k = nn.Linear(config.d_model, width)
        self.v = nn.Linear(config.d_model, width)
        self.o = nn.Linear(width, config.d_model)
        self.mlp_in = nn.Linear(config.d_model, config.mlp_width)
        self.mlp_out = nn.Linear(config.mlp_width, config.d_model)


class TracrTransformer(nn.Module):
    """tracr's compiled transformer in plain torch: the reference forward of a tracr model."""

    def __init__(self, config: TracrConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embed = nn.Embedding(len(config.input_vocab), config.d_model)
        self.pos_embed = nn.Embedding(config.max_seq_len + 1, config.d_model)
        self.layers = nn.ModuleList(TracrLayer(config) for _ in range(config.n_layers))
        self.unembed = nn.Linear(config.d_model, config.n_outputs, bias=False)

    def attention_mask(self, input_ids: Tensor) -> Tensor:
        """[B, 1, T, T] bool, True where a query may attend to a key: no padding keys, no future keys if causal."""
        allowed = (input_ids != self.config.input_vocab.index(self.config.pad))[:, None, None, :]
        if self.config.causal:
            length = input_ids.shape[1]
            allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        return allowed

    def forward(self, input_ids: Tensor) -> TracrOutput:
        batch, length = input_ids.shape
        heads, width = self.config.n_heads, self.config.head_dim
        allowed = self.attention_mask(input_ids)
        x = self.token_embed(input_ids) + self.pos_embed(torch.arange(length, device=input_ids.device))
        for layer in self.layers:
            q, k, v = (proj(x).view(batch, length, heads, width).transpose(1, 2) for proj in (layer.q, layer.k, layer.v))
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(width)
            mixed = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v  # [B, H, T, K]
            x = x + layer.o(mixed.transpose(1, 2).reshape(batch, length, heads * width))
            x = x + layer.mlp_out(F.relu(layer.mlp_in(x)))
        return TracrOutput(logits=self.unembed(x))


class TracrAdapter(ModelAdapter):
    """Adapter for ``TracrTransformer`` (see the module docstring)."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__(hf_model)
        config: TracrConfig = hf_model.config
        heads, width, d_model = config.n_heads, config.head_dim, config.d_model
        self.layout = Layout(family="tracr", n_layers=config.n_layers, n_heads=heads, n_kv_heads=heads,
                             d_model=d_model, head_dim=width, vocab_size=config.n_outputs)

        def per_head(linear: nn.Linear) -> Tensor:  # [H*K, D] -> [D, H, K]
            return linear.weight.view(heads, width, d_model).permute(2, 0, 1)

        self.attention = [
            AttentionWeights(
                norm=lambda x: x,
                out_proj=layer.o,
                w_q=per_head(layer.q), w_k=per_head(layer.k), w_v=per_head(layer.v),
                w_o=layer.o.weight.view(d_model, heads, width),
                b_q=layer.q.bias.view(heads, width), b_k=layer.k.bias.view(heads, width),
                b_v=layer.v.bias.view(heads, width),
                b_o_share=layer.o.bias / heads,
                scale=1.0 / math.sqrt(width),
            )
            for layer in hf_model.layers
        ]

    def prepare(self, input_ids: Tensor) -> RunContext:
        return RunContext(input_ids=input_ids, attention_mask=self.hf_model.attention_mask(input_ids))

    def embed(self, ctx: RunContext) -> Tensor:
        positions = torch.arange(ctx.input_ids.shape[1], device=ctx.input_ids.device)
        return self.hf_model.token_embed(ctx.input_ids) + self.hf_model.pos_embed(positions)[None]

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        block = self.hf_model.layers[layer]
        return block.mlp_out(F.relu(block.mlp_in(x)))

    def unembed(self, x: Tensor) -> Tensor:
        return self.hf_model.unembed(x)

    def final_norm(self) -> None:
        return None

    def logits_from_normed(self, y: Tensor) -> Tensor:
        return self.hf_model.unembed(y)


def tracr_tokenizer(config: TracrConfig) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the program's input vocabulary (ids as tracr's input encoder)."""
    vocab = {token: i for i, token in enumerate(config.input_vocab)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=config.pad))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=config.pad, bos_token=config.bos,
                                   unk_token=config.pad)


def load_tracr(folder: Path) -> tuple[TracrTransformer, PreTrainedTokenizerFast]:
    """The model and tokenizer of a tracr directory, weights checked against the config's shapes."""
    config = TracrConfig.read(folder / "config.json")
    model = TracrTransformer(config)
    try:
        weights = load_file(str(folder / "weights.safetensors"))
    except (OSError, RuntimeError) as error:
        raise ModelNotFoundError(f"{folder / 'weights.safetensors'}: unreadable ({error}); {REBUILD}") from error
    state = {"token_embed.weight": weights["token_embed"], "pos_embed.weight": weights["pos_embed"],
             "unembed.weight": weights["unembed"].T}
    for layer in range(config.n_layers):
        for part in ("q", "k", "v", "o", "mlp_in", "mlp_out"):
            state[f"layers.{layer}.{part}.weight"] = weights[f"layers.{layer}.{part}.weight"].T
            state[f"layers.{layer}.{part}.bias"] = weights[f"layers.{layer}.{part}.bias"]
    expected = model.state_dict()
    wrong = [name for name in expected if name not in state or state[name].shape != expected[name].shape]
    if wrong:
        raise ModelNotFoundError(f"{folder}: weights {', '.join(wrong[:3])} missing or of the wrong shape; {REBUILD}")
    model.load_state_dict({name: tensor.contiguous() for name, tensor in state.items()})
    return model, tracr_tokenizer(config)


def _rows(matrix: Tensor) -> set[int]:
    """Indices of the non-zero rows of [D, *]."""
    return set(torch.nonzero(matrix.abs().sum(dim=1)).flatten().tolist())


def written_and_read(model: TracrTransformer) -> tuple[dict[str, set[int]], dict[str, set[int]]]:
    """Residual dimensions each source writes and each reader reads (graph names), from the weights."""
    config = model.config
    heads, width = config.n_heads, config.head_dim
    writes = {"input": _rows(model.token_embed.weight.T) | _rows(model.pos_embed.weight.T)}
    reads = {"logits": _rows(model.unembed.weight.T)}
    for index, layer in enumerate(model.layers):
        for head in range(heads):
            cols = slice(head * width, (head + 1) * width)
            writes[f"a{index}.h{head}"] = _rows(layer.o.weight[:, cols])
            for kind in ("q", "k", "v"):
                reads[f"a{index}.h{head}<{kind}>"] = _rows(getattr(layer, kind).weight[cols].T)
        writes[f"m{index}"] = _rows(layer.mlp_out.weight) | set(torch.nonzero(layer.mlp_out.bias).flatten().tolist())
        reads[f"m{index}"] = _rows(layer.mlp_in.weight.T)
    return writes, reads


def true_edges(model: TracrTransformer) -> set[str]:
    """The ground-truth circuit: edges whose reader reads a residual dimension the source writes."""
    from ..graph import Graph  # the graph imports this package's adapter module

    writes, reads = written_and_read(model)
    graph = Graph.from_layout(TracrAdapter(model).layout)
    edges = set()
    for s, source in enumerate(graph.source_names):
        for r, reader in enumerate(graph.reader_names):
            if graph.real[s, r] and writes[source] & reads[reader]:
                edges.add(f"{source}->{reader}")
    return edges


NO_VALUE_BELOW = 0.5  # a categorical output whose largest entry is below this holds no value (tracr's None)


def decode_outputs(config: TracrConfig, logits: Tensor) -> Tensor:
    """The program's output per row of ``logits`` [..., V]: the argmax index, or -1 where the output holds no
    value; for a numerical program the value itself.

    A categorical output is one-hot (entries near 1) when the program has a value there. Where it has none
    (an aggregate whose selector matches nothing: ``shift_by`` at the first position) every entry is near 0
    and the argmax is decided by the softmax's leaks of 1e-9 onto other keys, which tracr's own decoder
    reports as if it were a value."""
    if config.numerical:
        return logits[..., 0]
    best, index = logits.max(-1)
    return torch.where(best >= NO_VALUE_BELOW, index, torch.full_like(index, -1))


def sample_inputs(config: TracrConfig, lengths: Tensor, generator: torch.Generator) -> Tensor:
    """Token ids [N, 1 + max(lengths)]: BOS, then ``lengths[i]`` tokens drawn uniformly from the
    program's vocabulary, then padding."""
    specials = {config.bos, config.pad}
    values = torch.tensor([i for i, token in enumerate(config.input_vocab) if token not in specials])
    width = 1 + int(lengths.max())
    drawn = values[torch.randint(len(values), (len(lengths), width), generator=generator)]
    ids = torch.full_like(drawn, config.input_vocab.index(config.pad))
    ids[:, 0] = config.input_vocab.index(config.bos)
    real = torch.arange(width)[None, :] <= lengths[:, None]
    real[:, 0] = False
    return torch.where(real, drawn, ids)
