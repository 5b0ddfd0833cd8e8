"""Block Caching, FasterCache's CFG cache and the exports to diffusers' caches and engines, all calibrated from the
same traces; and the HTML report. Real runs use the built-in digits model (a few seconds on 2 CPU cores)."""

import ast
import base64
import contextlib
import functools
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import jsonschema
import numpy as np
import pytest
import torch
import yaml

import calib.runtime as cr
from calib.methods.block_cache import method as block_cache
from calib.methods.fastercache_cfg import method as fastercache
from calib.methods.fbcache import method as fbcache
from calib.methods.magcache import method as magcache
from calib.exports import diffusers as diffusers_target
from calib.exports import engines
from calib.adapters import model_identity
from calib.cli import main
from calib.methods.registry import load_document, validate as validate_document, write_document
from calib.coeffs.schema import schema
from calib.hooking import wrap_forward
from calib.store import TraceSet, Trajectory, read_traces
from calib.trace import TraceSettings, run_trace
from helpers import generation

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STEPS = 12
PROMPTS = ["a handwritten 0", "a handwritten three", "the digit five", "a handwritten seven"]


# ---------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def traced(tmp_path_factory, pipe):
    """A real trace of the built-in model: 4 prompts x seeds 0,1, 12 steps, batched CFG."""
    work = tmp_path_factory.mktemp("seed")
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    path = run_trace("builtin:digits", prompts, TraceSettings(steps=STEPS, seeds=(0, 1)), out=work / "d.h5",
                     echo=lambda *a: None, pipe=pipe)
    return work, path, read_traces([path])


def _traj(stream, blocks, *, seed=0, extra=None, component="transformer", n=None):
    blocks = np.asarray(blocks, dtype=np.float32)
    n = blocks.shape[0] if n is None else n
    t = np.linspace(1000, 50, n)
    return Trajectory(
        prompt="p", seed=seed, stream=stream, component=component, steps=n, guidance=3.0, resolution=(8, 8),
        step_index=np.arange(n), timesteps=t, sigmas=t / 1000, input_rel_l1=np.r_[np.nan, np.full(n - 1, 0.1)],
        output_rel_l1=np.r_[np.nan, np.full(n - 1, 0.1)], residual_rel_l1=np.r_[np.nan, np.full(n - 1, 0.1)],
        block_rel_l1=blocks, block_names=[f"transformer_blocks.{i}" for i in range(blocks.shape[1])],
        extra=extra or {},
    )


def _set(trajs, model_class="FluxTransformer2DModel"):
    info = {"class": model_class, "source": "synthetic", "config_hash": "sha256:0", "scheduler": "S"}
    return TraceSet(model_info=info, trajectories=trajs, files=["synthetic.h5"], attrs=[{}])


generate = functools.partial(generation.generate, steps=STEPS)  # tests/helpers/generation.py


class BlockCounter:
    """Counts, per block, how often the block's body ran: a forward hook on a layer inside it (a hook on the block
    itself would also fire when a cache returns early from the block's forward)."""

    def __init__(self, transformer):
        self.counts = {}
        self.batches = []
        self.handles = []
        for stack in ("transformer_blocks", "single_transformer_blocks"):
            for i, block in enumerate(getattr(transformer, stack)):
                name = f"{stack}.{i}"
                self.counts[name] = 0
                inner = block.norm1 if hasattr(block, "norm1") else block.norm
                self.handles.append(inner.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, inputs, output):
            self.counts[name] += 1
            if name == "transformer_blocks.0":
                self.batches.append(inputs[0].shape[0])
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------------------
# block-cache: derivation on synthetic traces
# ---------------------------------------------------------------------------------------------------------------
def test_block_schedule_rule_on_synthetic_changes():
    n = 10
    changes = np.full((n, 3), np.nan)
    changes[1:, 0] = 0.1  # slow block: accumulates 0.1, 0.2, 0.3 -> recompute every third step at T = 0.25
    changes[1:, 1] = 0.3  # fast block: over the threshold every step
    changes[1:, 2] = 0.0  # static block: only the forced first and last steps
    sched = block_cache.block_mask(changes, 0.25)
    assert np.flatnonzero(sched[:, 0]).tolist() == [0, 3, 6, 9]
    assert sched[:, 1].all()
    assert np.flatnonzero(sched[:, 2]).tolist() == [0, n - 1]
    assert block_cache.block_mask(changes, 0.0).all()  # threshold 0 computes everything
    huge = block_cache.block_mask(changes, 1e9)
    assert all(np.flatnonzero(huge[:, j]).tolist() == [0, n - 1] for j in range(3))
    # the fraction only falls as the threshold grows
    fractions = [block_cache.compute_fraction(changes, t) for t in np.linspace(0, 2, 40)]
    assert all(a >= b for a, b in zip(fractions, fractions[1:]))


def test_block_cache_tune_and_document_from_synthetic_traces(tmp_path):
    rng = np.random.default_rng(0)
    n, b = 16, 4
    base = np.r_[[np.full(b, np.nan)], 0.05 + 0.2 * rng.random((n - 1, b))]
    trajs = [_traj(s, base * (1 + 0.05 * k), seed=k) for k in range(3) for s in ("cond", "uncond")]
    ts = _set(trajs)
    names, mean, _, count = block_cache.block_changes(ts)
    assert count == 6 and names == [f"transformer_blocks.{i}" for i in range(b)]
    np.testing.assert_allclose(mean[1:], np.mean([t.block_rel_l1[1:] for t in trajs], axis=0), rtol=1e-6)
    for target in (0.9, 0.6, 0.4):
        chosen, rows = block_cache.choose_threshold({"transformer": mean}, target)
        assert chosen.compute_fraction <= target
        smaller = [r for r in rows if r.threshold < chosen.threshold]
        assert all(r.compute_fraction > target for r in smaller)  # the least aggressive schedule meeting it
    doc, plots = block_cache.build_document(ts, target_fraction=0.6)
    assert doc["method"] == "block-cache"
    jsonschema.Draft202012Validator(schema()).validate(doc)
    comp = doc["block_cache"]["components"]["transformer"]
    assert comp["changes"][0] == [None] * b and len(comp["changes"]) == n
    sched = block_cache.block_mask(mean, doc["thresholds"]["recommended"])
    assert comp["schedule"] == {nm: np.flatnonzero(sched[:, j]).tolist() for j, nm in enumerate(names)}
    write_document(doc, tmp_path / "x.blockcache.json")
    config = cr.load(tmp_path / "x.blockcache.json")
    assert isinstance(config, cr.BlockCacheConfig) and config.recommended_threshold == doc["thresholds"]["recommended"]
    png = block_cache.heatmap_png(plots)
    from PIL import Image

    assert Image.open(io.BytesIO(png)).size[0] > 400


def test_block_cache_refuses_bad_input(tmp_path):
    with pytest.raises(Exception, match="per-block|no-blocks"):
        block_cache.block_changes(_set([_traj("cond", np.zeros((5, 0)))]))
    doc, _ = block_cache.build_document(_set([_traj("cond", np.r_[[[np.nan] * 2], np.full((5, 2), 0.1)])]))
    bad = json.loads(json.dumps(doc))
    bad["block_cache"]["components"]["transformer"]["changes"][2] = [0.1]
    with pytest.raises(Exception, match=r"changes\[2\]"):
        validate_document(bad, source="f.json")
    assert validate_document(json.loads(json.dumps(doc)))  # TeaCache files and these share one schema
    write_document(doc, tmp_path / "b.json")
    assert main(["export", str(tmp_path / "b.json"), "--format", "poly1d"]) == 2  # one-line error, exit 2
    assert main(["export", str(tmp_path / "b.json"), "--format", "json", "--out", str(tmp_path / "c.json")]) == 0


# ---------------------------------------------------------------------------------------------------------------
# block-cache: the runtime on the built-in model
# ---------------------------------------------------------------------------------------------------------------
def _block_config(pipe, changes, recommended=None):
    ident = model_identity(pipe.transformer)
    names = [f"transformer_blocks.{i}" for i in range(2)] + [f"single_transformer_blocks.{i}" for i in range(4)]
    doc = {
        "format": "calib.coefficients", "schema_version": 1, "method": "block-cache", "calib_version": "0.1.0",
        "created": "2026-11-23T08:00:00Z", "model": {"class": ident["class"], "config_hash": ident["config_hash"]},
        "calibration": {},
        "block_cache": {"rule": block_cache.RULE, "components": {"transformer": {
            "blocks": names, "steps": len(changes),
            "changes": [[None if not np.isfinite(v) else float(v) for v in row] for row in changes]}}},
    }
    if recommended is not None:
        doc["thresholds"] = {"recommended": recommended}
    return cr.parse(doc)


def _run_block_cache(pipe, mode, threshold):
    """(uncached output, cached output, stats, schedule, block-body calls per block) of one generation with a
    schedule in which every block changes by 0.1 per step."""
    changes = np.r_[[[np.nan] * 6], np.full((STEPS - 1, 6), 0.1)]
    config = _block_config(pipe, changes)
    base = generate(pipe, mode)
    counter = BlockCounter(pipe.transformer)
    try:
        with cr.apply(pipe, config, threshold=threshold) as handle:
            cached = generate(pipe, mode)
            stats, schedule = handle.stats(), handle.schedule()
    finally:
        counter.remove()
    return base, cached, stats, schedule, counter.counts


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_block_cache_threshold_zero_reproduces_output_exactly(pipe, mode):
    base, cached, stats, _, counts = _run_block_cache(pipe, mode, 0.0)
    assert torch.equal(base, cached)
    streams = 1 if mode == "batched" else 2
    assert stats["skipped"] == 0 and stats["computed"] == stats["blocks"] == STEPS * 6 * streams
    assert set(counts.values()) == {STEPS * streams}


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_block_cache_huge_threshold_computes_each_block_on_first_and_last_step_only(pipe, mode):
    base, cached, stats, schedule, counts = _run_block_cache(pipe, mode, 1e9)
    assert set(map(tuple, schedule.values())) == {(0, STEPS - 1)}
    streams = 1 if mode == "batched" else 2
    assert set(counts.values()) == {2 * streams}  # the block bodies really ran twice per stream
    for traj in stats["trajectories"]:
        assert set(traj["computed_per_block"].values()) == {2}
        assert traj["blocks"] == STEPS * 6
    assert torch.isfinite(cached).all() and not torch.equal(base, cached)
    assert generate(pipe, mode).equal(base)  # removed: the model is as before


def test_block_cache_recommended_schedule_runs_as_calibrated(pipe, traced, tmp_path):
    _, path, ts = traced
    assert main(["fit", "--method", "block-cache", str(path), "--out", str(tmp_path / "d.blockcache.json")]) == 0
    assert (tmp_path / "d.blockcache.png").stat().st_size > 5000
    config = cr.load(tmp_path / "d.blockcache.json")
    doc = config.document
    predicted = next(r for r in doc["thresholds"]["table"] if r["threshold"] == doc["thresholds"]["recommended"])
    assert predicted["compute_fraction"] <= 0.6
    base = generate(pipe, seed=5)
    with cr.apply(pipe, config) as handle:
        cached = generate(pipe, seed=5)
        stats = handle.stats()
        assert handle.schedule() == doc["block_cache"]["components"]["transformer"]["schedule"]
    assert stats["compute_fraction"] == pytest.approx(predicted["compute_fraction"], abs=1e-6)
    err = float((cached - base).abs().mean() / base.abs().mean())
    assert 0 < err < 0.1
    # calib tune picks the threshold for a target fraction of block evaluations and records it
    bc = tmp_path / "d.blockcache.json"
    assert main(["tune", str(path), "--coeffs", str(bc), "--compute-fraction", "0.4", "--write"]) == 0
    tuned = cr.load(bc)
    th = tuned.document["thresholds"]
    chosen = next(r for r in th["table"] if r["threshold"] == th["recommended"])
    assert chosen["compute_fraction"] <= 0.4
    with cr.apply(pipe, tuned) as handle:
        generate(pipe, seed=5)
        # a static schedule: the runtime computes exactly the block evaluations calib tune predicted
        assert handle.stats()["compute_fraction"] == pytest.approx(chosen["compute_fraction"], abs=1e-6)
    assert main(["tune", str(path), "--coeffs", str(bc), "--max-error", "0.1"]) == 2


def test_block_cache_and_fastercache_rows_join_the_frontier(pipe, traced, tmp_path):
    """Block Caching runs in the frontier with calib's schedule and is matched on the compute share (it skips
    blocks, rarely a whole forward); diffusers' FasterCache is reported as not applicable on the packed-token image
    model, with the reason, instead of a made-up row."""
    from calib.evaluate.frontier import PARTIAL, format_frontier, run_frontier

    _, _, ts = traced
    result = run_frontier(pipe, None, ts, ["a handwritten 3"], (5,), steps=STEPS, guidance=3.0,
                          rows=("block-cache", "fastercache"), echo=lambda *a: None)
    assert {"block-cache", "fastercache"} <= PARTIAL
    entry = result["methods"]["block-cache"]
    assert entry["matched_on"] == "compute"
    points = sorted(entry["points"], key=lambda p: p["setting"]["threshold"])
    assert len(points) >= 3
    computes = [p["compute"] for p in points]
    assert computes == sorted(computes, reverse=True)  # a larger threshold never computes more blocks
    assert computes[-1] < 0.6 and all(p["compute"] >= p["fraction"] for p in points)
    errors = [p["latent_rel_l1"] for p in points]
    assert errors[-1] > errors[0] > 0  # skipping more blocks costs accuracy
    assert "packed tokens" in result["not_applicable"]["fastercache"]
    table = format_frontier(result)
    assert "calib Block Caching" in table and "diffusers FasterCache" in table
    # calib report draws the frontier of a `calib eval --compare` results file: every method's points and the table
    _, path, _ = traced
    page_of = {}
    for name, frontier in (("plain", None), ("compare", result)):
        results = {"format": "calib.eval", "results": [{"threshold": 0.1, "speedup": 1.5, "psnr": 40.0}]}
        if frontier is not None:
            results["frontier"] = frontier
        (tmp_path / f"{name}.json").write_text(json.dumps(results))
        out = tmp_path / f"{name}.html"
        assert main(["report", str(path), "--eval", str(tmp_path / f"{name}.json"), "--out", str(out)]) == 0
        page = out.read_text(encoding="utf-8")
        page_of[name] = page[page.index("id='frontier'"):]
    parsed = {}
    for name, section in page_of.items():
        parser = _Images()
        parser.feed(section)
        parsed[name] = parser.srcs
    assert len(parsed["compare"]) == len(parsed["plain"]) + 1
    assert "calib Block Caching (per-block mask)" in page_of["compare"]
    assert "calib Block Caching" not in page_of["plain"]


# ---------------------------------------------------------------------------------------------------------------
# the tracer's new series
# ---------------------------------------------------------------------------------------------------------------
def test_trace_records_cfg_delta_mag_ratio_and_head_residual(traced, pipe, tmp_path):
    by_gen = {}
    ts = traced[2]
    for t in ts.trajectories:
        by_gen.setdefault((t.prompt, t.seed), {})[t.stream] = t
    for streams in by_gen.values():
        cond, uncond = streams["cond"], streams["uncond"]
        for name in ("cfg_delta_rel_l1", "residual_norm_ratio", "head_residual_rel_l1"):
            assert np.isnan(cond.extra[name][0]) and np.all(np.isfinite(cond.extra[name][1:])), name
        np.testing.assert_array_equal(cond.extra["cfg_delta_rel_l1"], uncond.extra["cfg_delta_rel_l1"])
        assert np.all(cond.extra["residual_norm_ratio"][1:] > 0)
    # batched and sequential CFG measure the same difference (the hooks see it either way)
    work, _, _ = traced
    seq = run_trace("builtin:digits", work / "prompts.txt", TraceSettings(steps=STEPS, seeds=(0,),
                    pipeline_kwargs={"cfg_mode": "sequential"}), out=tmp_path / "s.h5", echo=lambda *a: None,
                    pipe=pipe)
    seq_trajs = read_traces([seq]).trajectories
    assert {t.stream for t in seq_trajs} == {"cond", "uncond"}
    for t in seq_trajs:
        ref = by_gen[(t.prompt, 0)]
        np.testing.assert_allclose(t.extra["cfg_delta_rel_l1"][1:], ref["cond"].extra["cfg_delta_rel_l1"][1:],
                                   rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# diffusers' own caches, enabled on the built-in model
# ---------------------------------------------------------------------------------------------------------------
def _run_diffusers(pipe, config, mode, seeds=(3, 4)):
    """Computed steps of the tail block per stream and generation, counted by a forward hook inside it."""
    counter = BlockCounter(pipe.transformer)
    pipe.transformer.enable_cache(config)
    try:
        for seed in seeds:
            ctx = pipe.transformer.cache_context("cfg") if mode == "batched" else contextlib.nullcontext()
            with ctx:
                generate(pipe, mode, seed=seed, prompts=("a handwritten 3",))
            pipe.transformer._reset_stateful_cache()  # what diffusers pipelines do at the end (maybe_free_model_hooks)
    finally:
        pipe.transformer.disable_cache()
        counter.remove()
    per = len(seeds) * (1 if mode == "batched" else 2)
    return counter.counts["single_transformer_blocks.3"] / per, counter


@pytest.mark.parametrize("speedup", [1.5, 2.0])
def test_diffusers_magcache_export_changes_computed_steps_as_predicted(pipe, traced, tmp_path, speedup):
    from diffusers import MagCacheConfig

    _, path, _ = traced
    out = tmp_path / "mag.json"
    assert main(["export", str(path), "--format", "diffusers-magcache", "--target-speedup", str(speedup),
                 "--out", str(out)]) == 0
    kwargs = json.loads(out.read_text())
    assert set(kwargs) == {"threshold", "max_skip_steps", "retention_ratio", "num_inference_steps", "mag_ratios"}
    assert kwargs["num_inference_steps"] == STEPS and kwargs["mag_ratios"][0] == 1.0
    predicted = sum(magcache.replay(kwargs["mag_ratios"], kwargs["threshold"], num_steps=STEPS))
    assert predicted <= STEPS / speedup + 1e-9
    for mode in ("batched", "sequential"):
        computed, _ = _run_diffusers(pipe, MagCacheConfig(**json.load(open(out))), mode)
        assert abs(computed - predicted) <= 0.15 * predicted, (mode, computed, predicted)
        assert computed < STEPS


def test_magcache_ratios_are_diffusers_calibration_values(pipe, traced, capsys):
    """diffusers' own calibrate mode, on the same generation, prints the ratios the tracer recorded."""
    from diffusers import MagCacheConfig

    _, _, ts = traced
    traj = next(t for t in ts.trajectories if t.stream == "cond" and t.seed == 0 and t.prompt == PROMPTS[0])
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    try:
        g = torch.Generator().manual_seed(0)
        pipe(PROMPTS[0], num_inference_steps=STEPS, guidance_scale=3.0, generator=g, output_type="latent",
             cfg_mode="sequential")
    finally:
        pipe.transformer.disable_cache()
    printed = [json.loads(m) for m in re.findall(r"\[1\.0[^\]]*\]", capsys.readouterr().out)]
    assert printed, "diffusers printed no calibration ratios"
    np.testing.assert_allclose(printed[0][1:], traj.extra["residual_norm_ratio"][1:], rtol=1e-3)


@pytest.mark.parametrize("speedup", [1.5, 2.0])
def test_diffusers_fbcache_export_changes_computed_steps_as_predicted(pipe, traced, tmp_path, speedup):
    from diffusers import FirstBlockCacheConfig

    _, path, ts = traced
    out = tmp_path / "fbc.json"
    assert main(["export", str(path), "--format", "diffusers-fbcache", "--target-speedup", str(speedup),
                 "--out", str(out)]) == 0
    kwargs = json.loads(out.read_text())
    assert set(kwargs) == {"threshold"} and kwargs["threshold"] > 0
    _, info = fbcache.fit_config(ts, target_speedup=speedup)
    predicted = info["computed_steps_mean"]
    for mode in ("sequential", "batched"):
        computed, counter = _run_diffusers(pipe, FirstBlockCacheConfig(**json.load(open(out))), mode)
        assert abs(computed - predicted) <= 0.15 * predicted, (mode, computed, predicted)
        assert counter.counts["transformer_blocks.0"] > counter.counts["single_transformer_blocks.3"]


# ---------------------------------------------------------------------------------------------------------------
# FasterCache
# ---------------------------------------------------------------------------------------------------------------
def test_fastercache_fields_come_from_the_data():
    n = 24
    c = np.full(n, 0.5)
    c[0] = np.nan
    c[2:18] = 0.05  # the cond - uncond difference is steady only over steps 2..17
    blocks = np.r_[[[np.nan] * 2], np.full((n - 1, 2), 0.1)]

    def traces(series):
        return _set([_traj(s, blocks, seed=k, extra={"cfg_delta_rel_l1": series}) for k in range(2)
                     for s in ("cond", "uncond")])

    doc = fastercache.build_document(traces(c), cfg_tolerance=0.21)
    jsonschema.Draft202012Validator(schema()).validate(doc)
    entry = doc["fastercache_cfg"]["components"]["transformer"]
    t = np.asarray(entry["timesteps"])
    # 0.05 per step and a tolerance of 0.21: the reused difference may be 4 steps old, so every 5th iteration
    # computes both passes (N = 5 skips 13 of the 16 steady steps; N = 4 would skip 12)
    assert entry["unconditional_batch_skip_range"] == 5
    assert entry["uncond_skipped_steps"] == [s for s in range(2, 18) if s % 5]
    lo, hi = entry["unconditional_batch_timestep_skip_range"]
    assert [i for i in range(n) if lo < t[i] < hi] == list(range(2, 18))
    kwargs, info = diffusers_target.fastercache_config(doc)
    assert kwargs["unconditional_batch_timestep_skip_range"] == [lo, hi]
    assert kwargs["unconditional_batch_skip_range"] == 5
    assert kwargs["_unconditional_conditional_input_kwargs_identifiers"][-1] == "pooled_projections"
    # a tighter tolerance allows less staleness: a smaller N
    tight = fastercache.build_document(traces(c), cfg_tolerance=0.06)["fastercache_cfg"]["components"]["transformer"]
    assert tight["unconditional_batch_skip_range"] == 2
    # move the steady part, and the range follows (nothing is diffusers' default (5, (-1, 641)))
    c2 = np.full(n, 0.5)
    c2[0], c2[12:20] = np.nan, 0.05
    moved = fastercache.build_document(traces(c2), cfg_tolerance=0.21)["fastercache_cfg"]["components"]["transformer"]
    assert moved["uncond_skipped_steps"] and set(moved["uncond_skipped_steps"]) <= set(range(12, 20))
    lo2, hi2 = moved["unconditional_batch_timestep_skip_range"]
    assert [i for i in range(n) if lo2 < t[i] < hi2] == list(range(12, 20))
    with pytest.raises(Exception, match="cond/uncond"):
        fastercache.build_document(_set([_traj("cond", blocks, extra={"cfg_delta_rel_l1": c})]))


def test_diffusers_fastercache_export_runs_on_the_built_in_model(pipe, traced, tmp_path):
    """FasterCacheConfig(**json) is accepted by enable_cache and skips the unconditional pass where predicted.

    The built-in model returns packed tokens (B, 16, 4) as FLUX does; diffusers' FasterCache FFTs the output's last
    two dims, so the test views the output as BCHW inside the hook and packs it back outside (a layout shim, no
    change to what the transformer computes)."""
    from diffusers import FasterCacheConfig

    _, path, _ = traced
    assert main(["fit", "--method", "fastercache-cfg", str(path), "--out", str(tmp_path / "fc.json")]) == 0
    assert main(["export", str(tmp_path / "fc.json"), "--format", "diffusers-fastercache",
                 "--out", str(tmp_path / "fc.kwargs.json")]) == 0
    kwargs = json.load(open(tmp_path / "fc.kwargs.json"))
    entry = load_document(tmp_path / "fc.json")["fastercache_cfg"]["components"]["transformer"]
    assert kwargs["unconditional_batch_timestep_skip_range"] == entry["unconditional_batch_timestep_skip_range"]
    predicted = entry["uncond_skipped_steps"]
    assert predicted

    t = pipe.transformer

    def to_image(original, *a, **k):
        x = original(*a, **k)[0]
        return (x.view(x.shape[0], 4, 4, 4).permute(0, 3, 1, 2),)

    def to_tokens(original, *a, **k):
        x = original(*a, **k)[0]
        return (x.permute(0, 2, 3, 1).reshape(x.shape[0], 16, 4),)

    base = generate(pipe, prompts=("a handwritten 3",), seed=7)
    undo_inner = wrap_forward(t, to_image)
    t.enable_cache(FasterCacheConfig(**json.load(open(tmp_path / "fc.kwargs.json")),
                                     current_timestep_callback=lambda: float(
                                         pipe.scheduler.timesteps[pipe.scheduler.step_index or 0])))
    undo_outer = wrap_forward(t, to_tokens)
    counter = BlockCounter(t)
    try:
        cached = generate(pipe, prompts=("a handwritten 3",), seed=7)
    finally:
        counter.remove()
        undo_outer()
        t._reset_stateful_cache()
        t.disable_cache()
        undo_inner()
    skipped = [i for i, b in enumerate(counter.batches) if b == 1]
    assert skipped == predicted
    err = float((cached - base).abs().mean() / base.abs().mean())
    assert 0 < err < 0.1
    assert generate(pipe, prompts=("a handwritten 3",), seed=7).equal(base)


# ---------------------------------------------------------------------------------------------------------------
# engines
# ---------------------------------------------------------------------------------------------------------------
def _teacache_doc(coefficients, components=("transformer",), indicator="modulated_input"):
    comp = {"coefficients": coefficients, "order": "highest_first", "degree": len(coefficients) - 1, "domain": None}
    return validate_document({
        "format": "calib.coefficients", "schema_version": 1, "method": "teacache", "calib_version": "0.1.0",
        "created": "2026-11-23T08:00:00Z", "model": {"class": "FluxTransformer2DModel", "source": "x"},
        "indicator": {"name": indicator}, "calibration": {}, "components": {c: dict(comp) for c in components},
        "thresholds": {"recommended": 0.3},
    })


def test_engine_exports_have_the_engines_parameters():
    coef = [498.65, -283.78, 55.86, -3.82, 0.264]
    text, usage, notes = engines.vllm_omni(_teacache_doc(coef))
    assert json.loads(text) == {"rel_l1_thresh": 0.3, "coefficients": coef}
    assert "tea_cache" in usage
    text, usage, notes = engines.tensorrt_llm(_teacache_doc(coef, ("transformer", "transformer_2")))
    cache = yaml.safe_load(text)["cache_config"]
    assert cache == {"cache_backend": "teacache", "teacache_thresh": 0.3, "use_ret_steps": False,
                     "coefficients": coef, "coefficients_2": coef}
    assert any("timestep embedding" in n for n in notes)  # fitted on modulated_input: warned
    text, usage, notes = engines.sglang(_teacache_doc(coef))
    call = ast.parse(text).body[-1].value
    assert call.func.id == "TeaCacheParams"
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    assert kw == {"teacache_thresh": 0.3, "coefficients": coef, "start_skipping": 1, "end_skipping": -1}
    with pytest.raises(Exception, match="degree-4"):
        engines.vllm_omni(_teacache_doc(coef + [0.1]))
    with pytest.raises(Exception, match="> 0"):
        engines.vllm_omni(_teacache_doc(coef), threshold=0.0)


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------
class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.ids, self.external = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a.get("src", ""))
        if "id" in a:
            self.ids.append(a["id"])
        if tag in ("script", "link") or (tag == "img" and not a.get("src", "").startswith("data:")):
            self.external.append(tag)


@pytest.fixture(scope="module")
def report(traced):
    work, path, _ = traced
    assert main(["fit", str(path), "--out", str(work / "d.json"), "--degree", "4", "--bootstrap", "0",
                 "--no-plot"]) == 0
    assert main(["fit", "--method", "block-cache", str(path), "--out", str(work / "d.bc.json"), "--no-plot"]) == 0
    results = {"results": [{"method": "teacache", "threshold": t, "speedup": s, "psnr": p}
                           for t, s, p in [(0.1, 1.3, 44.0), (0.3, 1.8, 38.0)]]}
    (work / "eval.json").write_text(json.dumps(results))
    out = work / "report" / "report.html"
    assert main(["report", str(path), "--coeffs", str(work / "d.json"), "--coeffs", str(work / "d.bc.json"),
                 "--eval", str(work / "eval.json"), "--out", str(out)]) == 0
    return out


def test_report_has_all_sections_and_decodable_images(report):
    from PIL import Image

    page = report.read_text(encoding="utf-8")
    parser = _Images()
    parser.feed(page)
    assert {"summary", "fit", "curves", "tuning", "heatmap", "fastercache", "frontier"} <= set(parser.ids)
    assert not parser.external  # self-contained
    assert len(parser.srcs) >= 5  # fit, curves, heat-map, cfg, frontier
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        img.load()
        assert img.size[0] > 200 and img.size[1] > 100
    assert 'class="chosen"' in page  # the recommended rows are marked


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no chromium on this machine (apt-get install -y chromium); the HTML itself is checked above")
    shot = tmp_path / "shot.png"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1280,4000", f"--screenshot={shot}", report.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.shape == (4000, 1280)
    assert img.std() > 20  # not a blank page: text, tables and plots rendered


def test_diffusers_fastercache_on_the_video_built_in_model_as_is(wan, tmp_path):
    """builtin:wan-digits returns video latents (BCFHW) and batches CFG as [uncond, cond]: diffusers' FasterCache runs
    on it unchanged, and skips the unconditional pass exactly where the calibrated file says. Its weights ship in
    calib/models/weights, so loading it (the ``wan`` fixture, tests/conftest.py) must succeed: a failure fails."""
    from diffusers import FasterCacheConfig

    wpipe = wan
    prompts = tmp_path / "p.txt"
    prompts.write_text("a handwritten 3\nthe digit seven\n")
    path = run_trace("builtin:wan-digits", prompts, TraceSettings(steps=10, seeds=(0,)), out=tmp_path / "w.h5",
                     echo=lambda *a: None, pipe=wpipe)
    assert main(["export", str(path), "--format", "diffusers-fastercache", "--out", str(tmp_path / "fc.json")]) == 0
    kwargs = json.load(open(tmp_path / "fc.json"))
    assert kwargs["tensor_format"] == "BCFHW"
    doc = fastercache.build_document(read_traces([path]))
    predicted = doc["fastercache_cfg"]["components"]["transformer"]["uncond_skipped_steps"]
    t = wpipe.transformer
    batches = []
    hook = t.blocks[0].attn1.register_forward_hook(lambda m, i, o: batches.append(i[0].shape[0]))
    t.enable_cache(FasterCacheConfig(**kwargs, current_timestep_callback=lambda: float(
        wpipe.scheduler.timesteps[wpipe.scheduler.step_index or 0])))
    try:
        g = torch.Generator().manual_seed(4)
        wpipe(["a handwritten 3"], num_inference_steps=10, guidance_scale=3.0, generator=g, output_type="latent")
    finally:
        hook.remove()
        t._reset_stateful_cache()
        t.disable_cache()
    assert predicted and [i for i, b in enumerate(batches) if b == 1] == predicted
