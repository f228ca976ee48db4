"""PUT /items/availability, GET /items/unavailable: items taken out of the recommendations (sold out,
withdrawn) and put back, for every replica at once (the store shares the set; each replica reads its
own copy on the request path)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from service.schemas import AvailabilityRequest, AvailabilityResponse, Problem, UnavailableItems
from service.state import MetricsDep, RuntimeDep, VersionsDep

router = APIRouter(tags=["items"])


@router.put(
    "/items/availability",
    response_model=AvailabilityResponse,
    responses={413: {"model": Problem}, 422: {"model": Problem}, 503: {"model": Problem}},
)
async def set_availability(
    body: AvailabilityRequest, versions: VersionsDep, metrics: MetricsDep
) -> AvailabilityResponse:
    """Mark items unavailable (``available: false``: never recommended, whatever their scores; the
    memories that name them say so in explanations) or available again. Every id must be known (the
    model's, or registered from /interactions): otherwise a 422 names them and nothing changes. Once it
    returns, this replica's answers reflect it; the others' within their replication lag. With two
    model versions side by side both apply it (the primary's vocabulary decides what is known)."""
    rt = versions.primary
    limit = rt.settings.max_events_per_batch
    if len(body.items) > limit:
        raise HTTPException(413, f"the request holds {len(body.items)} items; the limit is {limit}")
    ids = await rt.items.known(body.items, "items")
    with versions.writes.write():
        changed = await rt.store.set_available(ids, body.available)
        for other in versions.runtimes[1:]:
            await other.store.set_available(await other.items.those_known(body.items), body.available)
    unavailable = int((await rt.store.unavailable_items()).size)
    metrics.unavailable_items.set(unavailable)
    return AvailabilityResponse(items=len(set(ids)), changed=changed, unavailable=unavailable)


@router.get("/items/unavailable", response_model=UnavailableItems, responses={503: {"model": Problem}})
async def unavailable_items(rt: RuntimeDep) -> UnavailableItems:
    """Every item marked unavailable, in internal id order."""
    names = await rt.items.names()
    out = []
    for item in (await rt.store.unavailable_items()).tolist():
        try:
            out.append(names.external(item))
        except KeyError:  # marked by another model version sharing the namespace
            continue
    return UnavailableItems(items=out)
