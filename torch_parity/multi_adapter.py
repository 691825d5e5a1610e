"""Named adapters vs PEFT on the real MiniLM: several adapters exported in PEFT's
one-folder-per-adapter layout and loaded with ``load_adapter``, PEFT's mixed-batch
``adapter_names=`` forward vs ``adapter_ids=``, and ``add_weighted_adapter`` (linear, cat,
svd) vs `jax_lora.combine_adapters`."""

from __future__ import annotations

import numpy as np
import torch

from .comparisons import ALL, _minilm, _np, row

# three adapters on different layers, ranks and scales ("it" has another rank: cat/svd only)
_SPECS = {
    "fr": dict(rank=4, alpha=8.0, targets=r".*/attention/self/(query|value)"),
    "de": dict(rank=4, alpha=4.0, targets=r".*/attention/self/(query|key)"),
    "it": dict(rank=6, alpha=12.0, targets=r".*/attention/self/value|.*/attention/output/dense"),
}


def _setup():
    import jax
    import jax.numpy as jnp

    import jax_lora

    bert, d, cfg, ids, mask = _minilm()
    params = bert.load_params(d, cfg)
    configs = {k: jax_lora.LoraConfig(**s) for k, s in _SPECS.items()}
    wrapped = jax_lora.wrap(bert.Bert(cfg), configs)
    v = wrapped.init(jax.random.key(0), ids, mask)
    leaves, treedef = jax.tree.flatten(v["lora"])
    keys = jax.random.split(jax.random.key(1), len(leaves))
    lora = treedef.unflatten(
        [
            0.05 * jax.random.normal(k, t.shape, jnp.float32)
            for k, t in zip(keys, leaves, strict=True)
        ]
    )
    return bert, d, cfg, ids, mask, params, configs, wrapped, lora


def _peft_model(bert, d, directory: str, names):
    import os

    import transformers
    from peft import PeftModel

    hf = transformers.BertModel.from_pretrained(
        d, add_pooling_layer=False, attn_implementation="eager"
    ).eval()
    pm = PeftModel.from_pretrained(hf, os.path.join(directory, names[0]), adapter_name=names[0])
    for k in names[1:]:
        pm.load_adapter(os.path.join(directory, k), adapter_name=k)
    return pm.eval()


def multi_adapter_minilm() -> list:
    """Export three adapters with `export_peft_adapters`, load them into one PEFT model, and
    compare each adapter alone, a mixed batch, and the weighted combinations."""
    import tempfile

    import jax.numpy as jnp

    import jax_lora

    bert, d, cfg, ids, mask, params, configs, wrapped, lora = _setup()
    names = list(configs)
    keep = mask.astype(bool)
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    v = {"params": params, "lora": lora}
    base = bert.Bert(cfg).apply({"params": params}, ids, mask)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jax_lora.export_peft_adapters(tmp + "/ad", lora, configs, torch_name=bert.torch_name)
        pm = _peft_model(bert, d, tmp + "/ad", names)
    with torch.no_grad():
        outs_j, outs_t = [], []
        for k in names:
            pm.set_adapter(k)
            outs_t.append(_np(pm(input_ids=ids_t, attention_mask=mask_t).last_hidden_state))
            outs_j.append(np.asarray(wrapped.clone(active=k).apply(v, ids, mask)))
            assert np.abs(outs_j[-1] - np.asarray(base))[keep].max() > 1e-2, "no-op adapter"
        rows.append(
            row(
                "MiniLM 3 named adapters: export_peft_adapters -> PEFT load_adapter, each alone",
                [o[keep] for o in outs_j],
                [o[keep] for o in outs_t],
            )
        )
        batch_ids = np.array([2, 0, -1])  # the 3 sentences: "it", "fr", base
        peft_names = [names[i] if i >= 0 else "__base__" for i in batch_ids]
        mixed_t = pm(input_ids=ids_t, attention_mask=mask_t, adapter_names=peft_names)
        mixed_j = wrapped.apply(v, ids, mask, adapter_ids=jnp.asarray(batch_ids))
        rows.append(
            row(
                "MiniLM mixed batch: adapter_ids=[2,0,-1] vs PEFT adapter_names=",
                np.asarray(mixed_j)[keep],
                _np(mixed_t.last_hidden_state)[keep],
            )
        )
        with tempfile.TemporaryDirectory() as tmp:  # and back: PEFT's save_pretrained
            pm.save_pretrained(tmp)
            trees, configs2 = jax_lora.import_peft_adapters(tmp, flax_path=bert.flax_path)
        assert sorted(trees) == sorted(names), sorted(trees)
        back = jax_lora.wrap(bert.Bert(cfg), {k: configs2[k] for k in names})
        mixed_back = back.apply(
            {"params": params, "lora": trees}, ids, mask, adapter_ids=jnp.asarray(batch_ids)
        )
        rows.append(
            row(
                "MiniLM 3 adapters: PEFT save_pretrained -> import_peft_adapters, mixed batch",
                np.asarray(mixed_back)[keep],
                _np(mixed_t.last_hidden_state)[keep],
            )
        )
        for kind, weights in (
            ("linear", {"fr": 0.7, "de": -0.4}),
            ("cat", {"fr": 0.7, "de": -0.4, "it": 1.5}),
            ("svd", {"fr": 0.7, "de": -0.4, "it": 1.5}),
        ):
            new = f"mix_{kind}"
            pm.add_weighted_adapter(list(weights), list(weights.values()), new, kind)
            pm.set_adapter(new)
            out_t = pm(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
            tree, config = jax_lora.combine_adapters(lora, configs, weights, combination=kind)
            out_j = jax_lora.wrap(bert.Bert(cfg), config).apply(
                {"params": params, "lora": tree}, ids, mask
            )
            assert config.rank == pm.peft_config[new].r
            rows.append(
                row(
                    f"MiniLM add_weighted_adapter {kind} (r={config.rank}) vs combine_adapters",
                    np.asarray(out_j)[keep],
                    _np(out_t)[keep],
                )
            )
            if kind == "svd":  # factors are defined up to rotation: compare delta-W
                layer = "encoder/layer_2/attention/self/value"
                mod = pm.base_model.model.get_submodule(bert.torch_name(layer))
                node = tree
                for part in layer.split("/"):
                    node = node[part]
                dw_j = np.asarray(node["a"] @ node["b"]).T  # torch layout (out, in)
                rows.append(
                    row(
                        f"MiniLM add_weighted_adapter svd: delta-W at {layer}",
                        dw_j,
                        _np(mod.get_delta_weight(new)),
                    )
                )
    return rows


ALL["multi_adapter_minilm"] = multi_adapter_minilm
