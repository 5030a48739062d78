"""Unit tests for the api_tokens.yml reader shared by model_load and model_probe."""

from __future__ import annotations

import pytest
from ansible_collections.llmstack.inference.plugins.module_utils import _tabbyapi

ADMIN = "a" * 32
API = "b" * 32


class Failed(Exception):
    pass


class FakeModule:
    """The three things key_from_params uses of an AnsibleModule."""

    def __init__(self, **params):
        self.params = dict({"api_key": None, "admin_key": None, "api_tokens_file": None}, **params)
        self.no_log_values = set()

    def fail_json(self, msg, **_kwargs):
        raise Failed(msg)


def tokens_file(tmp_path, text):
    path = tmp_path / "api_tokens.yml"
    if text is not None:
        path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("text", "token_key", "expected"),
    [
        ("admin_key: %s\napi_key: %s\n" % (ADMIN, API), "admin_key", ADMIN),
        ("admin_key: %s\napi_key: %s\n" % (ADMIN, API), "api_key", API),
        ("admin_key: %s\napi_key:\n- %s\n- other\n" % (ADMIN, API), "api_key", API),
        ("api_key: '%s'\n" % API, "api_key", API),
    ],
)
def test_read_api_token(tmp_path, text, token_key, expected):
    assert _tabbyapi.read_api_token(tokens_file(tmp_path, text), token_key, token_key) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (None, "is not readable (No such file or directory): TabbyAPI writes it on its first start"),
        ("admin_key: [unclosed\n", "cannot be used: it is not valid YAML"),
        ("- %s\n- %s\n" % (ADMIN, API), "cannot be used: it holds a YAML list, not the mapping"),
        ("", "has no admin_key: restore the file TabbyAPI wrote, or give admin_key"),
        ("api_key: %s\n" % API, "has no admin_key"),
        ("admin_key: []\n", "has no admin_key"),
        ("admin_key: {nested: map}\n", "has no admin_key"),
    ],
)
def test_unusable_tokens_file_names_the_fix(tmp_path, text, needle):
    path = tokens_file(tmp_path, text)
    with pytest.raises(_tabbyapi.TokenFileError) as failure:
        _tabbyapi.read_api_token(path, "admin_key", "admin_key")
    assert path in str(failure.value)
    assert needle in str(failure.value)


def test_key_read_from_the_file_becomes_a_no_log_value(tmp_path):
    module = FakeModule(api_tokens_file=tokens_file(tmp_path, "admin_key: %s\napi_key: %s\n" % (ADMIN, API)))
    assert _tabbyapi.key_from_params(module, "admin_key", "admin_key") == ADMIN
    assert module.no_log_values == {ADMIN}


@pytest.mark.parametrize("tokens", [None, "api_key: %s\n" % API])
def test_key_option_wins_over_the_file(tmp_path, tokens):
    path = tokens_file(tmp_path, tokens) if tokens else None
    module = FakeModule(api_key="given", api_tokens_file=path)
    assert _tabbyapi.key_from_params(module, "api_key", "api_key") == "given"
    # An option declared no_log is hidden by Ansible itself; nothing else to add.
    assert module.no_log_values == set()


def test_no_key_without_option_or_file():
    module = FakeModule()
    assert _tabbyapi.key_from_params(module, "api_key", "api_key") is None


def test_bad_file_fails_the_module(tmp_path):
    module = FakeModule(api_tokens_file=tokens_file(tmp_path, "admin_key: [unclosed\n"))
    with pytest.raises(Failed, match="not valid YAML"):
        _tabbyapi.key_from_params(module, "admin_key", "admin_key")
    assert module.no_log_values == set()
