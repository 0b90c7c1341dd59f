"""GET /v1/models (OpenAI shape) and the registry's versions and aliases."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends
from pydantic import Field

from registry.manifest import VariantRecord
from registry.store import ModelRegistry, ModelVersionInfo
from service.deps import PoolDep, RegistryDep, require_json
from service.model_pool.pool import split_reference
from service.schemas import AliasUpdate, ModelCard, ModelList, VersionCard, VersionList

router = APIRouter(tags=["models"])


class ModelDetail(VersionCard):
    """A version card with its optimised variants (encoders/variants.py) and their fidelity gates.

    Kept here, beside the one route that answers it, rather than in service/schemas.py: only
    `GET /v1/models/{name}` shows variants (the version listings stay as they were)."""

    variant: VariantRecord | None = Field(
        default=None, description="The variant the reference names (`minilm/1:onnx-int8`), with its gate's numbers."
    )
    variants: dict[str, VariantRecord] = Field(
        default_factory=dict,
        description="Every variant derived from this version (`duet models optimize`); `fidelity.passed` says "
        "whether it is served.",
    )


def _detail(
    registry: ModelRegistry, name: str
) -> tuple[ModelVersionInfo, VariantRecord | None, dict[str, VariantRecord]]:
    base, spec = split_reference(name)
    info = registry.resolve(base)
    variant = registry.get_variant(info, spec.name).record if spec is not None else None
    return info, variant, registry.list_variants(info)


def _version_card(info: ModelVersionInfo, loaded: bool, asked: str | None = None) -> VersionCard:
    manifest = info.manifest
    return VersionCard(
        id=asked or info.ref,
        name=info.name,
        version=info.version,
        ref=info.ref,
        aliases=list(info.aliases),
        created=info.created_at_ms // 1000,
        trained=manifest.trained,
        description=manifest.description,
        contract=manifest.contract,
        lineage=manifest.lineage.model_dump(mode="json"),
        metrics=manifest.metrics,
        loaded=loaded,
    )


@router.get("/v1/models", response_model=ModelList, summary="List registered models")
async def list_models(registry: RegistryDep) -> ModelList:
    summaries = await anyio.to_thread.run_sync(registry.list_models)
    return ModelList(
        data=[
            ModelCard(
                id=s.name,
                created=s.created_at_ms // 1000,
                description=s.description,
                latest_version=s.latest_version,
                aliases=s.aliases,
            )
            for s in summaries
        ]
    )


@router.get("/v1/models/{name}", response_model=ModelDetail, summary="The version a reference resolves to")
async def get_model(name: str, registry: RegistryDep, pool: PoolDep) -> ModelDetail:
    """`name` or `name@alias` (URL-encode '@' as %40 if your client needs to), optionally with a variant
    (`minilm/1:onnx-int8`); OpenAI's fields name the reference asked for, so
    `client.models.retrieve("minilm").id == "minilm"`. Lists the version's variants with their gates' numbers."""
    info, variant, variants = await anyio.to_thread.run_sync(_detail, registry, name)
    ref = f"{info.ref}:{variant.name}" if variant is not None else info.ref
    card = _version_card(info, ref in pool.loaded, asked=name)
    return ModelDetail(**card.model_dump(), variant=variant, variants=variants)


@router.get("/v1/models/{name}/versions", response_model=VersionList, summary="All versions of a model")
async def list_versions(name: str, registry: RegistryDep, pool: PoolDep) -> VersionList:
    versions = await anyio.to_thread.run_sync(registry.list_versions, name)
    return VersionList(data=[_version_card(v, v.ref in pool.loaded) for v in versions])


@router.get("/v1/models/{name}/versions/{version}", response_model=VersionCard, summary="One version's manifest")
async def get_version(name: str, version: str, registry: RegistryDep, pool: PoolDep) -> VersionCard:
    info = await anyio.to_thread.run_sync(registry.get_version, name, version)
    return _version_card(info, info.ref in pool.loaded)


@router.get("/v1/models/{name}/aliases", response_model=dict[str, int], summary="A model's aliases")
async def list_aliases(name: str, registry: RegistryDep) -> dict[str, int]:
    return await anyio.to_thread.run_sync(registry.aliases, name)


@router.put(
    "/v1/models/{name}/aliases/{alias}",
    response_model=VersionCard,
    dependencies=[Depends(require_json)],
    summary="Point an alias at a version",
)
async def set_alias(name: str, alias: str, body: AliasUpdate, registry: RegistryDep, pool: PoolDep) -> VersionCard:
    await anyio.to_thread.run_sync(
        lambda: registry.set_alias(name, alias, body.version, require_compatible=body.require_compatible)
    )
    info = await anyio.to_thread.run_sync(registry.get_version, name, body.version)
    return _version_card(info, info.ref in pool.loaded)
