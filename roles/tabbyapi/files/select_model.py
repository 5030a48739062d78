"""Writes the config.yml TabbyAPI starts with: the role's config.yml, with the model the router last switched to.

Run by the tabbyapi unit's ExecStartPre as the tabbyapi user (installed by the tabbyapi role). The router
never writes TabbyAPI's files: after an in-place switch it records the model in its own file
(--active, /var/lib/llmstack/router-active/<backend>.json, {"id": ..., "model_name": ...}). This script
reads that record, looks the id up in the role's models.json (each declared model's config.yml
`model`/`draft_model` keys) and writes --out atomically, so a restarted TabbyAPI comes back with the last
switched model and that model's own settings. A missing, unreadable or unknown record leaves the role's
start-up model (config.yml as written) and says why; the script fails only when it cannot write --out.
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile

import yaml


def chosen_model(active_path, models):
    """The models.json entry the router's record names, or (None, reason)."""
    try:
        with open(active_path, encoding="utf-8") as handle:
            record = json.load(handle)
    except FileNotFoundError:
        return None, "no model switched by the router yet (%s absent)" % active_path
    except (OSError, ValueError) as exc:
        return None, "cannot read %s (%s)" % (active_path, exc)
    model_id = record.get("id") if isinstance(record, dict) else None
    entry = models.get("models", {}).get(model_id) if isinstance(model_id, str) else None
    if entry is None:
        return None, "%s names %r, which tabbyapi_models no longer declares" % (active_path, model_id)
    folder = record.get("model_name")
    if folder is not None and folder != entry["model"].get("model_name"):
        return None, "%s names %r in %s, but tabbyapi_models now has it in %s" % (
            active_path, model_id, folder, entry["model"].get("model_name"))
    return (model_id, entry), None


def effective_config(base, models, choice):
    config = dict(base or {})
    if choice is None:
        return config
    entry = choice[1]
    for section, keys in (("model", "model_keys"), ("draft_model", "draft_keys")):
        merged = {k: v for k, v in dict(config.get(section) or {}).items() if k not in models.get(keys, [])}
        merged.update(entry.get(section) or {})
        config[section] = merged
    return config


def write_atomic(path, text):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".config.yml.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="config.yml written by the role")
    parser.add_argument("--models", required=True, help="models.json written by the role")
    parser.add_argument("--active", required=True, help="the router's record of the switched model")
    parser.add_argument("--out", required=True, help="the config.yml TabbyAPI reads")
    parser.add_argument("--print-model", action="store_true",
                        help="print only the model folder a start would load (empty: none); write nothing")
    args = parser.parse_args(argv)
    with open(args.base, encoding="utf-8") as handle:
        base = yaml.safe_load(handle) or {}
    with open(args.models, encoding="utf-8") as handle:
        models = json.load(handle)
    choice, reason = chosen_model(args.active, models)
    config = effective_config(base, models, choice)
    if args.print_model:
        print((config.get("model") or {}).get("model_name") or "")
        return 0
    header = "# Written at each start by select_model.py from %s and %s; edit those, not this file.\n" % (
        args.base, args.models)
    write_atomic(args.out, header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False))
    model_name = (config.get("model") or {}).get("model_name") or "none"
    if choice is None:
        print("tabbyapi start-up model: %s (config.yml; %s)" % (model_name, reason))
    else:
        print("tabbyapi start-up model: %s (%s, the router's last switch)" % (model_name, choice[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
