"""Every supported architecture, end to end on a tiny random classifier: targets, pruning to
exactly 90%, save and reload with plain transformers, the sparsity report (API and CLI),
compressed and ONNX export, and the sparse CPU runtime."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import transformers as tf
from torch import nn

from sparsebert.allocation import masks_from_scores, n_pruned
from sparsebert.cli import main as cli_main
from sparsebert.errors import SparseBertError
from sparsebert.export import COMPRESS_MIN_SPARSITY, export_model, from_compressed
from sparsebert.report import sparsity_report
from sparsebert.runtime import native, sparsify_for_inference
from sparsebert.targets import select_targets

SPARSITY = 0.9
SIZES = {"vocab_size": 100, "max_position_embeddings": 64, "num_labels": 2}
BERT_LIKE = ("attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "intermediate.dense", "output.dense")  # fmt: skip


@dataclass
class Arch:
    config: tf.PretrainedConfig
    layer: str  # the layer stack, "{}" for the layer index
    linears: tuple[str, ...]  # the encoder linears of one layer
    embeddings: tuple[str, ...]
    pooler: tuple[str, ...]
    classifier: tuple[str, ...]
    native_attention: bool = True  # calls attention through transformers' interface


def _bert_family(cls: type, base: str, **extra) -> Arch:
    config = cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 **SIZES, **extra)  # fmt: skip
    has_pooler = base == "bert"
    return Arch(
        config, f"{base}.encoder.layer.{{}}.", BERT_LIKE,
        (f"{base}.embeddings.word_embeddings", f"{base}.embeddings.position_embeddings"),
        (f"{base}.pooler.dense",) if has_pooler else (),
        ("classifier",) if has_pooler else ("classifier.dense", "classifier.out_proj"),
    )  # fmt: skip


ARCHS = {
    "bert": _bert_family(tf.BertConfig, "bert"),
    "roberta": _bert_family(tf.RobertaConfig, "roberta", pad_token_id=1),
    "xlm-roberta": _bert_family(tf.XLMRobertaConfig, "roberta", pad_token_id=1),
    # embeddings narrower than the encoder: a projection that is no encoder linear
    "electra": _bert_family(tf.ElectraConfig, "electra", embedding_size=16),
    "distilbert": Arch(
        tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, **SIZES),
        "distilbert.transformer.layer.{}.",
        ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin",
         "ffn.lin1", "ffn.lin2"),
        ("distilbert.embeddings.word_embeddings", "distilbert.embeddings.position_embeddings"),
        (), ("pre_classifier", "classifier"),
    ),  # fmt: skip
    # v3-style: relative attention only; unshared position projections (not encoder linears)
    "deberta-v2": Arch(
        tf.DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
                           position_biased_input=False, share_att_key=False, **SIZES),
        "deberta.encoder.layer.{}.",
        ("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
         "attention.output.dense", "intermediate.dense", "output.dense"),
        ("deberta.embeddings.word_embeddings",), ("pooler.dense",), ("classifier",),
        native_attention=False,
    ),  # fmt: skip
    # fused QKV, GLU feed-forward (Wi gives 2 x intermediate), rotary positions; layer 1 uses
    # sliding-window attention over 16 tokens
    "modernbert": Arch(
        tf.ModernBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            local_attention=16, global_attn_every_n_layers=2, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, **SIZES),
        "model.layers.{}.", ("attn.Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo"),
        ("model.embeddings.tok_embeddings",), (), ("head.dense", "classifier"),
    ),  # fmt: skip
}


def batch(rows: int = 3, seq: int = 24) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[1, seq // 3 :] = 0
    return {"input_ids": torch.randint(5, 100, (rows, seq), generator=gen), "attention_mask": mask}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch()).logits


@dataclass
class Pruned:
    name: str
    arch: Arch
    model: nn.Module
    targets: list[str]
    dir: str


@pytest.fixture(scope="module", params=list(ARCHS))
def pruned(request, tmp_path_factory) -> Pruned:
    """The architecture's tiny classifier, encoder linears magnitude-pruned to exactly 90%
    (global), saved with save_pretrained."""
    arch = ARCHS[request.param]
    torch.manual_seed(0)
    model = tf.AutoModelForSequenceClassification.from_config(copy.deepcopy(arch.config)).eval()
    targets = select_targets(model, "encoder-linears")
    masks = masks_from_scores({n: p.detach().abs() for n, p in targets.items()}, SPARSITY)
    with torch.no_grad():
        for name, p in targets.items():
            p.masked_fill_(~masks[name], 0.0)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return Pruned(request.param, arch, model, list(targets), str(path))


def test_presets_select_exactly_the_architecture_parts(pruned):
    arch, model = pruned.arch, pruned.model
    expected = [arch.layer.format(i) + lin + ".weight" for i in range(2) for lin in arch.linears]
    assert pruned.targets == expected  # exactly these, in model order: 6 (ModernBERT 4) per layer
    assert len(expected) == 2 * (4 if pruned.name == "modernbert" else 6)

    def weights(names: tuple[str, ...]) -> set[str]:
        return {n + ".weight" for n in names}

    assert set(select_targets(model, "embeddings")) == weights(arch.embeddings)
    assert set(select_targets(model, "classifier")) == weights(arch.classifier)
    if arch.pooler:
        assert set(select_targets(model, "pooler")) == weights(arch.pooler)
    else:
        with pytest.raises(SparseBertError, match="matches no prunable"):
            select_targets(model, "pooler")


def test_saved_model_reloads_with_plain_transformers_at_exactly_90_percent(pruned, capsys):
    reloaded = tf.AutoModelForSequenceClassification.from_pretrained(pruned.dir).eval()
    assert type(reloaded) is type(pruned.model)
    mine, theirs = pruned.model.state_dict(), reloaded.state_dict()
    assert set(mine) == set(theirs)
    for name, t in mine.items():
        assert torch.equal(t, theirs[name]), name
    report = sparsity_report(reloaded, "encoder-linears")
    n = sum(mine[t].numel() for t in pruned.targets)
    assert [r["name"] for r in report["layers"]] == pruned.targets
    assert report["target_numel"] == n and report["target_zeros"] == n_pruned(n, SPARSITY)

    # the CLI loads the bare encoder (AutoModel): other names, the same matrices
    assert cli_main(["sparsity", pruned.dir, "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert len(cli["layers"]) == len(pruned.targets)
    assert cli["target_numel"] == n and cli["target_zeros"] == n_pruned(n, SPARSITY)
    assert cli["target_sparsity"] == pytest.approx(SPARSITY, abs=1e-3)


def test_compressed_export_gives_the_same_logits(pruned, tmp_path):
    report = export_model(pruned.dir, tmp_path, format="compressed")
    state = pruned.model.state_dict()
    sparse_enough = [t for t in pruned.targets
                     if float((state[t] == 0).float().mean()) >= COMPRESS_MIN_SPARSITY]  # fmt: skip
    assert report["sizes"]["n_compressed"] == len(sparse_enough) > 0
    assert report["sizes"]["compressed_bytes"] < report["sizes"]["dense_bytes"]
    restored = from_compressed(tmp_path)
    assert type(restored) is type(pruned.model)
    torch.testing.assert_close(logits(restored), logits(pruned.model), rtol=0, atol=1e-6)


def test_onnx_export_matches_pytorch(pruned, tmp_path):
    import onnxruntime as ort

    report = export_model(pruned.dir, tmp_path, format="onnx")["onnx"]
    assert report["max_abs_diff"] < 1e-4
    session = ort.InferenceSession(report["path"], providers=["CPUExecutionProvider"])
    feeds = batch()
    feeds.setdefault("token_type_ids", torch.zeros_like(feeds["input_ids"]))
    got = session.run(["logits"], {i.name: feeds[i.name].numpy() for i in session.get_inputs()})[0]
    np.testing.assert_allclose(got, logits(pruned.model).numpy(), atol=1e-4, rtol=0)


def test_sparse_runtime_matches_the_dense_model(pruned):
    sparse = copy.deepcopy(pruned.model)
    report = sparsify_for_inference(sparse, min_sparsity=0.3, calibrate=False)
    torch.testing.assert_close(logits(sparse), logits(pruned.model), rtol=0, atol=1e-4)
    # every encoder linear now runs on a sparse kernel (alone, fused or in a group)
    modules = dict(sparse.named_modules())
    for target in pruned.targets:
        assert type(modules[target.removesuffix(".weight")]) is not nn.Linear, target
    assert report.n_sparse > 0
    attention = [d for d in report.decisions if d.kind == "attention"]
    if native.library() is not None:
        assert len(attention) == 1 and attention[0].sparse == pruned.arch.native_attention
        if not pruned.arch.native_attention:  # kept as it is, and the report says why
            assert "attention interface" in attention[0].reason
            assert sparse.config._attn_implementation == pruned.model.config._attn_implementation


# ----------------------------------------------------------------- the runtime elsewhere


def _pruned_bert(**config) -> nn.Module:
    torch.manual_seed(1)
    model = tf.BertForSequenceClassification(tf.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        initializer_range=0.3, **SIZES, **config)).eval()  # fmt: skip
    targets = select_targets(model, "encoder-linears")
    masks = masks_from_scores({n: p.detach().abs() for n, p in targets.items()}, SPARSITY)
    with torch.no_grad():
        for name, p in targets.items():
            p.masked_fill_(~masks[name], 0.0)
    return model


@pytest.mark.parametrize("act", ["relu", "gelu_new", "silu"])
def test_feed_forward_with_another_activation_is_not_fused_as_gelu(act):
    model = _pruned_bert(hidden_act=act)
    sparse = copy.deepcopy(model)
    report = sparsify_for_inference(sparse, calibrate=False)
    assert "ffn" not in {d.kind for d in report.decisions}  # the fused kernel computes exact GELU
    assert report.n_sparse > 0
    torch.testing.assert_close(logits(sparse), logits(model), rtol=0, atol=1e-4)


def test_output_block_that_only_looks_like_bert_keeps_its_forward():
    class PostAdd(nn.Module):  # LayerNorm(dense(h)) + input: BERT's names, another function
        def __init__(self, block: nn.Module) -> None:
            super().__init__()
            self.dense, self.dropout, self.LayerNorm = block.dense, block.dropout, block.LayerNorm

        def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
            return self.LayerNorm(self.dropout(self.dense(hidden_states))) + input_tensor

    model = _pruned_bert()
    layer = model.bert.encoder.layer[0]
    layer.output = PostAdd(layer.output)
    sparse = copy.deepcopy(model)
    report = sparsify_for_inference(sparse, calibrate=False)
    torch.testing.assert_close(logits(sparse), logits(model), rtol=0, atol=1e-4)
    if native.library() is not None:
        kept = [d for d in report.decisions if d.kind == "add-norm" and not d.sparse]
        assert [d.name for d in kept] == ["bert.encoder.layer.0.output"]
        assert "kept" in kept[0].reason and isinstance(sparse.bert.encoder.layer[0].output, PostAdd)


def test_unknown_architecture_is_kept_where_torch_reads_weights_directly():
    # nn.TransformerEncoderLayer's inference fast path reads linear1/linear2.weight itself
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2,
                                    enable_nested_tensor=False)  # fmt: skip
    model = nn.Sequential(encoder, nn.Linear(32, 5)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.masked_fill_(p.abs() < p.abs().quantile(0.9), 0.0)
    x = torch.randn(2, 7, 32)
    sparse = copy.deepcopy(model)
    report = sparsify_for_inference(sparse, calibrate=False)
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x), model(x), rtol=0, atol=1e-5)
    kept = {d.name: d.reason for d in report.decisions if not d.sparse}
    assert set(kept) == {f"0.layers.{i}.linear{j}" for i in range(2) for j in (1, 2)}
    assert all("TransformerEncoderLayer reads this weight directly" in r for r in kept.values())
    assert [d.name for d in report.decisions if d.sparse] == ["1"]
