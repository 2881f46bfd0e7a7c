"""Shared fixtures: tiny models are built once per session; nothing is downloaded."""

import os

# Unknown names must fail at once instead of retrying a hub that cannot be reached.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

import hap  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama() -> hap.Model:
    return hap.load_model("tiny-llama", device="cpu")


@pytest.fixture(scope="session")
def tiny_gpt2() -> hap.Model:
    return hap.load_model("tiny-gpt2", device="cpu")


@pytest.fixture(scope="session", params=["tiny-llama", "tiny-gpt2"])
def tiny_model(request) -> hap.Model:
    return hap.load_model(request.param, device="cpu")


@pytest.fixture(scope="session")
def tiny_gpt2_64() -> hap.Model:
    return hap.load_model("tiny-gpt2", device="cpu", dtype="float64")
