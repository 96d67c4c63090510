"""The [[discover]] and [lifecycle] config sections (issue 9); config.py puts them into the ConfigModel."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Glob = Annotated[str, Field(min_length=1, max_length=200)]
Interval = Annotated[float, Field(ge=0.5, le=86400)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DiscoverConfig(_Section):
    """One source: every fine-tune of a repository (GET /api/repos/{namespace}/{repo}/fine_tunes)."""

    # "" until validated: the validator below defaults it to "namespace/repo"
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")] = ""
    namespace: Annotated[str, Field(min_length=1)]
    repo: Annotated[str, Field(min_length=1)]
    include: Annotated[list[Glob], Field(min_length=1, max_length=100)] = Field(default_factory=lambda: ["*"])
    exclude: Annotated[list[Glob], Field(max_length=100)] = Field(default_factory=list)
    created_by: Annotated[str, Field(max_length=256)] = ""
    interval_s: Interval = 60.0
    max_age_days: Annotated[float, Field(gt=0, le=36500)] = 7.0

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and "name" not in data:
            namespace, repo = data.get("namespace"), data.get("repo")
            if isinstance(namespace, str) and isinstance(repo, str) and namespace and repo:
                return {**data, "name": f"{namespace}/{repo}"}
        return data

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value == "config":
            raise ValueError('"config" is reserved: it labels the fine-tunes listed in [[fine_tunes]]')
        return value

    @field_validator("namespace", "repo")
    @classmethod
    def _path_segment(cls, value: str) -> str:
        if "/" in value or value.strip() != value or value in (".", ".."):
            raise ValueError("must be one URL path segment (no '/', no surrounding spaces)")
        return value

    @field_validator("created_by")
    @classmethod
    def _username(cls, value: str) -> str:
        if value.strip() != value:
            raise ValueError("must not have surrounding spaces")
        return value


class LifecycleConfig(_Section):
    """How fresh statuses are kept, how idle fine-tunes are polled, and when a run counts as stalled."""

    status_interval_s: Interval = 60.0
    idle_interval_s: Interval = 600.0
    stall_after_s: Annotated[float, Field(ge=0, le=30 * 86400)] = 0.0  # 0: off
