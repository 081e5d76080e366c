"""TransformerLens' own test files, run against `mechscope.tl`: pass / fail / not-applicable counts.

TransformerLens' tests are not stored in this repository. Fetch each file of `MANIFEST` from
https://github.com/TransformerLensOrg/TransformerLens (MIT licence) into ``.tl-upstream/raw/``
under its upstream path, e.g.::

    mkdir -p .tl-upstream/raw/tests/unit && cd .tl-upstream/raw
    curl -sL https://raw.githubusercontent.com/TransformerLensOrg/TransformerLens/<commit>/tests/unit/test_utils.py \\
        --create-dirs -o tests/unit/test_utils.py

then run::

    .venv/bin/python benchmarks/tl_upstream.py                # every fetched file
    .venv/bin/python benchmarks/tl_upstream.py test_utils -v  # files whose path contains "test_utils"

Each file is copied with two kinds of change only:

- imports: ``transformer_lens`` becomes ``mechscope.tl``; TransformerLens' one-class modules
  (``transformer_lens.HookedTransformer``, ``.HookedTransformerConfig``, ``.HookedRootModule``,
  ``.ActivationCache``, ``.FactoredMatrix``) are imported from ``mechscope.tl`` itself;
- model loading: the hub names of `MODELS` become tiny random local checkpoints of the same
  family (`tests.tl.checkpoints`, with 256 positions for the upstream prompts);
  TransformerLens-only families without a Hugging Face checkpoint (SoLU, attention-only) and
  GPT-Neo's TinyStories get the tiny GPT-2; Llama names get the tiny grouped-query Llama.

The same files also run, with only the model names changed, through TransformerLens 3.9 itself
(``.venv-tl``, built by ``tests/tl/make_env.sh``; ``--no-reference`` skips it). A test is *not
applicable* when it fails there too (a test of another TransformerLens version, or one that
cannot hold for a tiny random checkpoint), or when it tests something mechscope leaves out on
purpose (`NOT_APPLICABLE`, each with its reason). The rate is ``passed / (passed + failed)``
over the applicable tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAW = REPO / ".tl-upstream" / "raw"

MANIFEST = {
    "tests/unit/test_hook_points.py": "237fb22a2d54071a08c4001003f13de0129843fc",
    "tests/unit/test_hooked_root_module.py": "0bd221b1003a507553c800ebadb9349a290ebc27",
    "tests/unit/test_utils.py": "0582b769ce7e8c8bd7ad416eddfa5c8bb394bb91",
    "tests/unit/test_use_attn_result.py": "2145d41d707d526bf69ad6255ffc913d5bf95cad",
    "tests/unit/test_split_qkv.py": "1fa27436c8a7df8dde5ae0dfa6edc8f32849fc9f",
    "tests/unit/test_attention_mask.py": "317cd587acedd4fbefaf771dab434429a689543c",
    "tests/unit/test_start_at_layer.py": "0c464cbd0d929fa3fe51fa2f8ab68389155da43f",
    "tests/unit/test_stop_at_layer.py": "1fe4bf6982af59c1333e56c63267ee1463e84ca1",
    "tests/unit/test_kv_cache.py": "033393eda684fa5d28260418f9f756b92a301816",
    "tests/unit/factored_matrix/test_properties.py": "22cfecbb477222ac33164f0105051f94a80d524e",
    "tests/unit/factored_matrix/test_get_item.py": "2e373523d9ff2319fa9099ea8a37fb603f668b66",
    "tests/unit/factored_matrix/test_multiply_by_scalar.py": "0f71dc4744f8a2f8deaaf3e32ea96999f347b8d0",
    "tests/unit/factored_matrix/test_multiply_by_vector.py": "0ca7de36e27119c27c40fc021d809f74eda730e5",
    "tests/unit/factored_matrix/test_multiply_by_matrix.py": "1536307b5e9b0d6fc1dfc4a9b8e1b668f2448a1d",
    "tests/unit/factored_matrix/test_constructor.py": "84e5ecd601d7e702b847272dad56dc4817ba263d",
    "tests/unit/factored_matrix/test_multiply_by_factored_matrix.py": "0ca7de36e27119c27c40fc021d809f74eda730e5",
    "tests/unit/factored_matrix/test_multiply_by_tensor_like.py": "68adba9cf204bfb23f9210a729acdc6af93912d6",
    "tests/unit/factored_matrix/test_matmul_factored_matrix.py": "13e3119afdbc98aeb550d33581864eccce42bac3",
    "tests/unit/factored_matrix/test_matmul_tensor.py": "8bb3d06755c6f4156239d1f13833ced647f85971",
    "tests/unit/test_head_detector.py": "10d2f8a026d73eada861c7d51064f7e24d8f482c",
    "tests/unit/test_hooked_transformer_config.py": "30009290a4270bba57a2c02b5f0b959008023b17",
    "tests/integration/test_hooks.py": "04a4d4bee670cd0901b751a77c6bdab15e658ece",
    "tests/integration/test_cache_pos_slice.py": "84e5ecd601d7e702b847272dad56dc4817ba263d",
    "tests/integration/test_cross_entropy_loss.py": "96677c9b63117f9ffd99c7f5bfcc12026142888b",
    "tests/integration/test_prepend_bos.py": "f3da28b4de201065a2bfb099e27fc37ddf212e89",
}
"""Upstream path -> the commit it was read at."""

MODELS = {
    "gpt2": "gpt2",
    "gpt2-small": "gpt2",
    "distilgpt2": "gpt2",
    "solu-1l": "gpt2",
    "solu-2l": "gpt2",
    "gelu-2l": "gpt2",
    "attn-only-1l": "gpt2",
    "attn-only-2l": "gpt2",
    "attn-only-4l": "gpt2",
    "tiny-stories-1M": "gpt2",
    "roneneldan/TinyStories-1M": "gpt2",
    "meta-llama/Llama-2-7b-hf": "gqa",
}
"""Hub model name -> tiny local checkpoint (`tests.tl.checkpoints`)."""

ONE_CLASS_MODULES = (
    "HookedTransformerConfig",
    "HookedTransformer",
    "HookedRootModule",
    "ActivationCache",
    "FactoredMatrix",
)

NOT_APPLICABLE = {
    "test_hooked_root_module.py::test_enable_hook": "tests TransformerLens' private helpers (_enable_hook*) with mocks",
    "test_hooked_root_module.py::test_legacy_hook_points": "TransformerLens' own module move (a deprecation shim)",
    "test_hook_points.py::test_add_hook_prepend": "patches TransformerLens' private LensHandle class",
    "test_hook_points.py::test_enable_reshape": "TransformerBridge's hook conversions (model_bridge), outside scope",
    "test_hook_points.py::test_reshape_functionality": "TransformerBridge's hook conversions (model_bridge)",
    "test_hook_points.py::TestHookPointHasHooks::test_invalid_direction_raises_error": "asserts beartype's "
    "exception class (mechscope raises HookError, a ValueError)",
    "test_head_detector.py::test_detect_head_with_invalid_head_name": "asserts beartype's exception class "
    "(mechscope raises InputError, a ValueError)",
    "test_matmul_tensor.py::test_matmul_by_vector": "asserts bit-equality of A @ (B @ v) with (A @ B) @ v: float "
    "rounding decides it (TransformerLens computes the same order and passes or fails with the random draw)",
    "test_utils.py::test_test_prompt": "compares printed logits of the pretrained solu-1l model",
    "test_prepend_bos.py::TestPrependBos::test_default_prepend_bos[facebook/opt-125m]": "OPT: no local checkpoint "
    "(mechscope has no OPT adapter)",
    "test_prepend_bos.py::TestPrependBos::test_default_prepend_bos_to_false[facebook/opt-125m]": "OPT, as above",
    "test_prepend_bos.py::TestPrependBos::test_override_prepend_bos[facebook/opt-125m": "OPT, as above",
    "test_prepend_bos.py::TestPrependBos::test_prepend_bos_with_get_token_position[facebook/opt-125m]": "OPT",
    "test_prepend_bos.py::TestPrependBos::test_same_tokenization[facebook/opt-125m]": "OPT, as above",
    "test_start_at_layer.py::test_start_at_layer_kwargs": "shortformer positional embeddings with GPT-2's 50257-token "
    "vocabulary (needs the hub tokenizer)",
}
"""Node id prefix (file name::test) -> why the test does not apply."""

PLUGIN = """
import json, os
RESULTS = {}
def pytest_runtest_logreport(report):
    outcome = "failed" if report.failed else ("skipped" if report.skipped else "passed")
    if report.when == "call" or outcome != "passed":
        RESULTS.setdefault(report.nodeid, outcome)
        if outcome == "failed":
            RESULTS[report.nodeid] = "failed"
def pytest_collectreport(report):
    if report.failed:
        RESULTS[report.nodeid + "::<collection>"] = "failed"
def pytest_sessionfinish(session):
    with open(os.environ["TL_UPSTREAM_RESULTS"], "w") as f:
        json.dump(RESULTS, f)
"""


REFERENCE_CONFTEST = """
import json, os
from transformer_lens import supported_models
supported_models.OFFICIAL_MODEL_NAMES.extend(json.loads(os.environ["TL_UPSTREAM_CHECKPOINTS"]).values())
"""
"""TransformerLens accepts only the model names it lists: the reference run adds the checkpoints."""


def rewrite(source: str, checkpoints: dict[str, str], imports: bool = True) -> str:
    """TransformerLens' imports -> `mechscope.tl` (when ``imports``); hub model names -> local checkpoints."""
    for name, checkpoint in MODELS.items():
        source = re.sub(rf"([\"']){re.escape(name)}\1", repr(checkpoints[checkpoint]), source)
    if not imports:
        return source
    modules = "|".join(ONE_CLASS_MODULES)
    source = re.sub(
        rf"^(\s*)from transformer_lens\.({modules}) import", r"\1from mechscope.tl import", source, flags=re.M
    )
    source = re.sub(
        r"^(\s*)import transformer_lens\s*$", r"\1import mechscope.tl as transformer_lens", source, flags=re.M
    )
    return re.sub(r"^(\s*)(from|import) transformer_lens\b", r"\1\2 mechscope.tl", source, flags=re.M)


def not_applicable(nodeid: str) -> str | None:
    short = nodeid.split("/")[-1]
    return next((why for prefix, why in NOT_APPLICABLE.items() if short.startswith(prefix)), None)


def pytest_only(work: Path) -> Path:
    """A folder holding only pytest and its dependencies (linked from this environment), for the
    TransformerLens environment, which has no pytest of its own."""
    import _pytest
    import iniconfig
    import pluggy
    import pytest

    folder = work / "pytest-only"
    folder.mkdir(exist_ok=True)
    for module in (pytest, _pytest, pluggy, iniconfig):
        source = Path(module.__file__).parent
        if not (folder / source.name).exists():
            (folder / source.name).symlink_to(source)
    for extra in ("py.py",):
        source = Path(pytest.__file__).parents[1] / extra
        if source.exists() and not (folder / extra).exists():
            (folder / extra).symlink_to(source)
    return folder


def run_side(work: Path, side: str, files: list[str], checkpoints: dict[str, str], python: str) -> dict[str, str]:
    """Rewrite ``files`` for ``side`` ("mechscope" or "reference") under ``work/side`` and run them:
    ``{node id: passed | failed | skipped}``."""
    run = work / side
    run.mkdir(parents=True, exist_ok=True)
    (run / "pytest.ini").write_text("[pytest]\n")
    (run / "tl_upstream_plugin.py").write_text(PLUGIN)
    path_entries = [str(run)]
    if side == "reference":
        (run / "conftest.py").write_text(REFERENCE_CONFTEST)
        path_entries.append(str(pytest_only(work)))
    for path in files:
        source = rewrite((RAW / path).read_text(), checkpoints, imports=side == "mechscope")
        (run / Path(path).name).write_text(source)
    results_file = work / f"{side}.json"
    env = {**os.environ, "TL_UPSTREAM_RESULTS": str(results_file), "PYTHONPATH": os.pathsep.join(path_entries)}
    env["HF_HUB_OFFLINE"] = "1"
    env.update(TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    env["TL_UPSTREAM_CHECKPOINTS"] = json.dumps(checkpoints)
    cmd = [
        python,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "tl_upstream_plugin",
        "--tb=line",
        "--continue-on-collection-errors",
    ]
    subprocess.run([*cmd, *[Path(p).name for p in files]], cwd=run, env=env, stdout=subprocess.DEVNULL)
    return json.loads(results_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("match", nargs="*", help="run only files whose upstream path contains one of these")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every failing test")
    parser.add_argument("--keep", type=Path, help="write the rewritten files here and keep them")
    parser.add_argument("--no-reference", action="store_true", help="do not run TransformerLens 3.9 itself")
    args = parser.parse_args()
    files = [p for p in MANIFEST if not args.match or any(m in p for m in args.match)]
    missing = [p for p in files if not (RAW / p).is_file()]
    if missing:
        sys.exit(f"not fetched (see this file's docstring): {missing}")
    sys.path.insert(0, str(REPO))
    from tests.tl.checkpoints import build_checkpoints

    work = args.keep or Path(tempfile.mkdtemp(prefix="tl-upstream-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoints = {k: str(v) for k, v in build_checkpoints(work / "checkpoints", n_ctx=256).items()}
    results = run_side(work, "mechscope", files, checkpoints, sys.executable)
    reference: dict[str, str] = {}
    tl_python = REPO / ".venv-tl" / "bin" / "python"
    if not args.no_reference:
        if not tl_python.exists():
            sys.exit("TransformerLens 3.9 environment missing: bash tests/tl/make_env.sh (or pass --no-reference)")
        reference = run_side(work, "reference", files, checkpoints, str(tl_python))
    counts = {"passed": 0, "failed": 0, "not applicable": 0, "skipped": 0}
    per_file: dict[str, list[int]] = {}
    failures = []
    for nodeid, outcome in sorted(results.items()):
        # A file that does not import in TransformerLens 3.9 (written for another version) still
        # counts; a test that runs there and fails does not.
        if not_applicable(nodeid) or reference.get(nodeid, "passed") == "failed":
            outcome = "not applicable"
        counts[outcome] += 1
        row = per_file.setdefault(nodeid.split("::")[0], [0, 0, 0])
        row[("passed", "failed", "not applicable", "skipped").index(outcome) if outcome != "skipped" else 2] += 1
        if outcome == "failed":
            failures.append(nodeid)
    for name, (ok, bad, na) in sorted(per_file.items()):
        print(f"{name:45s} {ok:4d} passed {bad:4d} failed {na:4d} not applicable")
    applicable = counts["passed"] + counts["failed"]
    rate = 100 * counts["passed"] / applicable if applicable else 0.0
    print(", ".join(f"{v} {k}" for k, v in counts.items()) + f"; {rate:.1f}% of {applicable} applicable tests pass")
    if args.verbose:
        print("\n".join(failures))


if __name__ == "__main__":
    main()
