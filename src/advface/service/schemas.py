"""Request and response bodies of the template service (the OpenAPI schemas)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator

from advface.service.ids import SUBJECT_ID_HELP, normalise_subject_id

OCTET = "application/octet-stream"


class SubjectIn(BaseModel):
    subject_id: str = Field(description=f"client-chosen id, unique per tenant: {SUBJECT_ID_HELP}")

    @field_validator("subject_id")
    @classmethod
    def _canonical(cls, v: str) -> str:
        return normalise_subject_id(v)


class SubjectOut(BaseModel):
    subject_id: str
    created_at: str
    templates: int = 0


class SubjectPage(BaseModel):
    items: list[SubjectOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null at end")


class SubjectDeleted(BaseModel):
    subject_id: str
    deleted_templates: int


class TemplateOut(BaseModel):
    template_id: str
    subject_id: str
    protection: str
    protection_params: dict[str, Any]
    model_version: str
    created_at: str
    replayed: bool = Field(False, description="true when an idempotent retry found it stored")


class TemplateDeleted(BaseModel):
    template_id: str
    deleted: bool = True


class VerifyOut(BaseModel):
    subject_id: str
    score: float = Field(description="best cosine similarity over the subject's templates")
    match: bool
    threshold: float
    templates: int


class Candidate(BaseModel):
    subject_id: str
    score: float
    template_id: str
    match: bool


class IdentifyOut(BaseModel):
    candidates: list[Candidate]
    threshold: float


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    """Readiness only: ``/ready`` needs no API key, so it carries no counts or versions."""

    status: str


class ProtectionCount(BaseModel):
    protection: str
    protection_params: dict[str, Any]
    templates: int


class StatsOut(BaseModel):
    """The tenant's stored templates, per protection (with parameters) and per model of E."""

    templates: int
    by_protection: list[ProtectionCount]
    by_model_version: dict[str, int]


BINARY_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {OCTET: {"schema": {"type": "string", "format": "binary"}}},
        "description": "feature map E(x) (1,64,77,77) in the advface payload format "
        "(advface.service.payload: fp16, shape header, compressed)",
    }
}
