from fastapi import APIRouter, status

from agent.prompt import check_instructions
from api.deps import AdminKey, AnyKey, DrafterDep, SessionDep
from api.schemas import Id, KeyOut, KeyRequest, NewKeyOut, TenantOut, TenantUpdate
from feedback import service
from training import shadow

router = APIRouter(prefix="/v1", tags=["tenant"])


@router.get("/tenant", response_model=TenantOut, summary="The tenant of the calling key")
def get_tenant(key: AnyKey):
    return key.tenant


@router.patch(
    "/tenant",
    response_model=TenantOut,
    summary="Change the tenant's name, drafting instructions, adapter scale or shadow corrections",
)
def update_tenant(request: TenantUpdate, key: AdminKey, session: SessionDep, drafter: DrafterDep):
    """Instructions that would leave the email too little of the prompt budget are refused (422).
    Fields left out, or null, stay as they are; but `adapter_scale: null` clears the tenant's scale
    (each version is then served at its own chosen scale), and `shadow_corrections: null` turns
    shadow drafting off (candidates are promoted at once; a shadow running is rejected)."""
    if request.instructions is not None:
        check_instructions(drafter.tokenizer, request.instructions, drafter.settings.max_prompt_tokens)
    tenant = key.tenant
    for field, value in request.model_dump(exclude_none=True, exclude={"adapter_scale", "shadow_corrections"}).items():
        setattr(tenant, field, value)
    if "adapter_scale" in request.model_fields_set:
        service.set_adapter_scale(session, tenant, request.adapter_scale)
    if "shadow_corrections" in request.model_fields_set:
        shadow.set_corrections(session, tenant, request.shadow_corrections, actor=key.name)
    session.flush()
    return tenant


@router.get("/keys", response_model=list[KeyOut], summary="The tenant's API keys (never the keys themselves)")
def list_keys(key: AdminKey, session: SessionDep):
    return service.list_api_keys(session, key.tenant_id)


@router.post("/keys", response_model=NewKeyOut, status_code=status.HTTP_201_CREATED, summary="Create an API key")
def create_key(request: KeyRequest, key: AdminKey, session: SessionDep):
    created, raw_key = service.create_api_key(session, key.tenant, name=request.name, role=request.role)
    return NewKeyOut(**KeyOut.model_validate(created).model_dump(), key=raw_key)


@router.delete("/keys/{key_id}", response_model=KeyOut, summary="Revoke an API key")
def revoke_key(key_id: Id, key: AdminKey, session: SessionDep):
    return service.revoke_api_key(session, key.tenant_id, key_id)
