"""Model URIs: which model a URI names, and a local folder that holds it.

Every command, flow and stage that takes a model accepts the same forms, checked
here with the same messages:

- ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``: a registered version (an alias
  is pinned to the version it names when resolved);
- ``s3://...``: a checkpoint folder committed to the artifact store (a version's
  ``checkpoint_uri`` tag), checked against its manifest when it is downloaded;
- a local model folder.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.exceptions import MlflowException

from concise_rl import paths
from concise_rl import store as artifact_store
from concise_rl.config import PipelineConfig
from concise_rl.tasks import tracking


def resolve_model(cfg: PipelineConfig, uri: str, what: str | None = None) -> dict[str, str]:
    """``{"version", "uri"}`` of the model ``uri`` names: a registered version by number, or
    ``"local"`` with the URI itself for a folder on this machine or in the artifact store.

    ``what`` names the URI in error messages (default ``--model URI``). Raises LookupError
    for a malformed registry URI or one that names no version, FileNotFoundError for
    anything else that is not a model folder.
    """
    what = what or f"--model {uri}"
    if uri.startswith("models:/"):
        match = tracking.MODEL_URI.match(uri)
        if match is None:
            raise LookupError(f"{what}: not a registry URI; write models:/NAME/VERSION (a number) or "
                              "models:/NAME@ALIAS")
        name, number, alias = match["name"], match["version"], match["alias"]
        client = tracking.read_client(cfg)
        try:
            version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
        except MlflowException as exc:
            # A missing alias is INVALID_PARAMETER_VALUE in MLflow 3.17's stores, a missing model or version
            # RESOURCE_DOES_NOT_EXIST.
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            raise LookupError(f"{what}: {what_exists(client, name, number, alias)}; `concise-rl models` lists "
                              "the registered versions and their aliases") from None
        return {"version": str(version.version), "uri": tracking.model_uri(name, version.version)}
    if artifact_store.is_s3(uri):  # a checkpoint folder in the artifact store; checked when it is downloaded
        return {"version": "local", "uri": uri}
    if not Path(uri).is_dir():
        raise FileNotFoundError(f"{what}: not a models:/ URI, not an s3:// checkpoint folder and not a "
                                "model directory; pass a local model folder, models:/NAME/VERSION, "
                                "models:/NAME@ALIAS or a version's checkpoint_uri")
    return {"version": "local", "uri": uri}


def what_exists(client, name: str, number: str | None, alias: str | None) -> str:
    """Why ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` names nothing, with what the registry does hold."""
    from concise_rl.errors import did_you_mean

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = [m.name for m in client.search_registered_models(max_results=100)]
        held = f"registered models: {', '.join(names)}" if names else "the registry holds no model yet"
        missing = f", so no alias '{alias}'" if alias else ""
        return f"no registered model '{name}'{did_you_mean(name, names)}{missing}; {held}"
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    aliases = dict(sorted(model.aliases.items(), key=lambda kv: int(kv[1])))
    held = (f"its versions: {_ranges(versions) or 'none'}; its aliases: "
            f"{', '.join(f'{a} (v{v})' for a, v in aliases.items()) or 'none'}")
    if alias:
        return f"{name} has no alias '{alias}'{did_you_mean(alias, aliases)}; {held}"
    return f"{name} has no version {number}; {held}"


def _ranges(numbers: list[int]) -> str:
    """Sorted numbers as runs: [1, 2, 3, 5] -> "1-3, 5" (a registry may hold hundreds of versions)."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def local_model_dir(cfg: PipelineConfig, uri: str) -> str:
    """A local folder holding the model ``uri`` names (any form :func:`resolve_model` accepts).

    A registered version comes through MLflow (:func:`concise_rl.tasks.tracking.resolve_model_uri`).
    An ``s3://`` URI must be a folder committed with its manifest; it is downloaded once
    into ``<home>/downloads/``, every file checked against the manifest. Local paths
    pass through.
    """
    uri = resolve_model(cfg, uri)["uri"]
    if not artifact_store.is_s3(uri):
        return tracking.resolve_model_uri(uri)
    store = artifact_store.open_store(cfg.store)
    manifest = store.read_manifest(uri)
    if manifest is None:
        raise artifact_store.StoreError(
            f"--model {uri}: no {artifact_store.MANIFEST} there, so it is not a committed checkpoint folder (the "
            f"manifest is written last); use a version's checkpoint_uri tag (concise-rl models) or a models:/ URI"
        )
    target = paths.home() / "downloads" / f"store-{artifact_store.manifest_digest(manifest)[:16]}"
    if not (target / artifact_store.MANIFEST).is_file():
        store.download_dir(uri, target)
    return str(target)
