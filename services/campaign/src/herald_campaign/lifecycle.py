"""A campaign's life: created and changed as a draft, published, stopped, deleted."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from google.protobuf import field_mask_pb2
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from herald.campaign.v1 import campaign_service_pb2 as pb
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald_campaign.accounts import settings_of
from herald_campaign.records import State, announce_change, campaign_message, owned, set_state, state_name
from herald_campaign.references import References
from herald_campaign.storage import campaigns, stats
from herald_campaign.validation import (
    DLT_PROVIDERS,
    ENTITY_ID_PROVIDERS,
    UPDATABLE,
    check_ahead,
    spec_columns,
    stored_spec,
    validate_shape,
)
from herald_common import api, channels
from herald_common.auth import current_account_id
from herald_common.bus import Subjects
from herald_common.db import Database
from herald_common.errors import FailedPrecondition, NotFound, Validator, invalid
from herald_common.paging import keyset_page
from herald_common.validation import check_text_fields


def _stoppable(name: str, state: str) -> None:
    if state not in (state_name(State.STATE_SCHEDULED), state_name(State.STATE_RUNNING)):
        raise FailedPrecondition(
            name, f"only a scheduled or running campaign can be stopped; {name} is {state}"
        )


class Lifecycle:
    def __init__(
        self, database: Database, subjects: Subjects, references: References, notify: Callable[[], None]
    ) -> None:
        self.database = database
        self.subjects = subjects
        self.references = references
        self._notify = notify

    async def create(self, campaign: pb.Campaign, request_id: str) -> pb.Campaign:
        check = Validator()
        validate_shape(campaign, check)
        check.require(len(request_id) <= 200, "request_id", "at most 200 characters")
        check.raise_if_any()
        account_id = current_account_id()
        same_request = sa.and_(campaigns.c.account_id == account_id, campaigns.c.request_id == request_id)
        if request_id:
            async with self.database.transaction() as session:
                existing = (await session.execute(sa.select(campaigns).where(same_request))).first()
            if existing is not None:
                return campaign_message(existing)
        warnings = await self._check_references(campaign)
        spec = stored_spec(campaign)
        async with self.database.transaction() as session:
            row = (
                await session.execute(
                    insert(campaigns)
                    .values(
                        id=uuid.uuid4(),
                        account_id=account_id,
                        state=state_name(State.STATE_DRAFT),
                        request_id=request_id or None,
                        **spec_columns(spec),
                    )
                    .on_conflict_do_nothing(index_elements=[campaigns.c.account_id, campaigns.c.request_id])
                    .returning(*campaigns.c)
                )
            ).first()
            if row is None:  # a concurrent create with the same request_id won
                row = (await session.execute(sa.select(campaigns).where(same_request))).one()
            else:
                await session.execute(insert(stats).values(campaign_id=row.id, account_id=account_id))
                await announce_change(session, self.subjects, row)
        self._notify()
        created = campaign_message(row)
        created.warnings.extend(warnings)
        return created

    async def _check_references(self, campaign: pb.Campaign) -> list[str]:
        """The segment and destination exist, and the destination takes this kind of content;
        the campaign records the destination's kind. Answers warnings (a live trigger on events
        never sent)."""
        warnings = []
        if campaign.audience.WhichOneof("source") is not None:
            await self.references.audience(campaign.audience, "campaign.audience")
        if campaign.schedule.WhichOneof("when") == "live":
            warnings = await self.references.live_trigger(
                campaign.schedule.live.trigger, "campaign.schedule.live.trigger"
            )
        if campaign.HasField("goal"):
            warnings += await self.references.goal(campaign.goal, "campaign.goal")
        destination = await self.references.destination(campaign.destination, "campaign.destination")
        content = campaign.WhichOneof("content") or ""
        kinds = channels.for_content(content)
        kind = next((k for k in kinds if k.destination_enum == destination.type), None)
        if kind is None:
            type_name = dispatch_pb.DestinationType.Name
            raise invalid(
                f"campaign.{content}",
                f"{campaign.destination} is a {type_name(destination.type)} destination; "
                f"{content} content needs {' or '.join(type_name(k.destination_enum) for k in kinds)}",
            )
        campaign.destination_type = kind.destination_type
        if kind.destination_type == "mparticle" and campaign.schedule.live.delay.ToTimedelta():
            raise invalid(
                "campaign.schedule.live.delay",
                "an mParticle export is not triggered for live campaigns with a delay: "
                "send it as the user acts (no delay)",
            )
        return warnings

    async def update(self, campaign: pb.Campaign, update_mask: field_mask_pb2.FieldMask) -> pb.Campaign:
        api.parse_uuid_name(campaign.name, "campaigns", "campaign.name")
        current = await self.get(campaign.name)
        paths = list(update_mask.paths)
        if not paths:
            paths = [field.name for field, _ in campaign.ListFields() if field.name in UPDATABLE]
        elif paths == ["*"]:
            paths = sorted(UPDATABLE)
        refused = [p for p in paths if p.split(".")[0] not in UPDATABLE]
        if refused or not paths:
            raise invalid(
                "update_mask", f"can change only {', '.join(sorted(UPDATABLE))}; got {refused or 'nothing'}"
            )
        merged = pb.Campaign()
        merged.CopyFrom(current)
        try:
            field_mask_pb2.FieldMask(paths=paths).MergeMessage(campaign, merged, True, True)
        except ValueError as error:
            raise invalid("update_mask", str(error)) from None
        check = Validator()
        validate_shape(merged, check)
        check.raise_if_any()
        warnings = await self._check_references(merged)
        async with self.database.transaction() as session:
            row = await self._locked(session, campaign.name)
            if row.state != state_name(State.STATE_DRAFT):
                if any(p.split(".")[0] == "goal" for p in paths):
                    raise FailedPrecondition(
                        campaign.name,
                        f"the goal can change only while the campaign is a draft; it is {row.state}, and "
                        "conversions already counted against the goal would no longer mean the same",
                    )
                raise FailedPrecondition(campaign.name, f"only a draft can be changed; it is {row.state}")
            row = (
                await session.execute(
                    sa.update(campaigns)
                    .where(campaigns.c.id == row.id)
                    .values(
                        **spec_columns(stored_spec(merged)),
                        updated_at=api.utcnow(),
                        version=campaigns.c.version + 1,
                    )
                    .returning(*campaigns.c)
                )
            ).one()
            await announce_change(session, self.subjects, row)
        self._notify()
        updated = campaign_message(row)
        updated.warnings.extend(warnings)
        return updated

    async def delete(self, name: str) -> None:
        async with self.database.transaction() as session:
            row = await self._locked(session, name)
            if row.state != state_name(State.STATE_DRAFT):
                raise FailedPrecondition(name, f"only a draft can be deleted; {name} is {row.state}")
            await session.execute(sa.delete(stats).where(stats.c.campaign_id == row.id))
            await session.execute(sa.delete(campaigns).where(campaigns.c.id == row.id))

    async def _locked(self, session: AsyncSession, name: str) -> Any:
        campaign_id = api.parse_uuid_name(name, "campaigns")
        row = (
            await session.execute(sa.select(campaigns).where(owned(campaign_id)).with_for_update())
        ).first()
        if row is None:
            raise NotFound(name)
        return row

    async def get(self, name: str) -> pb.Campaign:
        campaign_id = api.parse_uuid_name(name, "campaigns")
        async with self.database.transaction() as session:
            row = (
                await session.execute(
                    sa.select(campaigns, stats.c.waiting_reason)
                    .outerjoin(stats, stats.c.campaign_id == campaigns.c.id)
                    .where(owned(campaign_id))
                )
            ).first()
        if row is None:
            raise NotFound(name)
        found = campaign_message(row)
        under_way = row.state in (state_name(State.STATE_SCHEDULED), state_name(State.STATE_RUNNING))
        found.state_reason = row.failure_reason or (row.waiting_reason if under_way else "") or ""
        return found

    async def list(self, request: pb.ListCampaignsRequest) -> tuple[list[pb.Campaign], str]:
        """A page of campaigns, newest first, narrowed to those using a segment or destination or
        in given states (how segmentation and dispatch learn whether what they delete is in use)."""
        check = Validator()
        check_text_fields(request, "", check)
        check.raise_if_any()
        where = [campaigns.c.account_id == current_account_id()]
        if request.segment:
            api.parse_uuid_name(request.segment, "segments", "segment")
            where.append(campaigns.c.segment == request.segment)
        if request.destination:
            api.parse_uuid_name(request.destination, "destinations", "destination")
            where.append(campaigns.c.destination == request.destination)
        if request.list:
            api.parse_uuid_name(request.list, "lists", "list")
            where.append(campaigns.c.segment == request.list)
        if request.states:
            where.append(campaigns.c.state.in_([state_name(s) for s in request.states]))
        async with self.database.transaction() as session:
            rows, next_token = await keyset_page(
                session, campaigns, request.page_size, request.page_token, *where
            )
        return [campaign_message(r) for r in rows], next_token

    async def publish(self, name: str) -> pb.Campaign:
        async with self.database.transaction() as session:
            row = await self._locked(session, name)
            if row.state != state_name(State.STATE_DRAFT):
                raise FailedPrecondition(name, f"only a draft can be published; {name} is {row.state}")
            spec = pb.Campaign.FromString(row.spec)
            now = api.utcnow()
            account, _ = await settings_of(session, row.account_id)
            notes = check_ahead(name, spec, now, account)
            await self._check_dlt(name, spec)
            row = await set_state(session, self.subjects, row.id, State.STATE_SCHEDULED, published_at=now)
        self._notify()
        published = campaign_message(row)
        published.publish_notes.extend(notes)
        return published

    async def _check_dlt(self, name: str, spec: pb.Campaign) -> None:
        """India's DLT rules: an SMS campaign that reaches +91 numbers through a provider carrying
        DLT ids (or a group with one) needs its content template id, and the provider's
        destination its principal entity id."""
        if spec.WhichOneof("content") != "sms":
            return
        destination = await self.references.destination(spec.destination, "campaign.destination")
        providers = [destination]
        if destination.WhichOneof("config") == "sms_provider_group":
            providers = [
                await self.references.destination(member, "campaign.destination")
                for member in destination.sms_provider_group.destinations
            ]
        kinds = {p.WhichOneof("config") or "" for p in providers}
        no_entity = [
            p.name
            for p in providers
            if p.WhichOneof("config") in ENTITY_ID_PROVIDERS
            and not getattr(p, p.WhichOneof("config") or "").dlt_entity_id
        ]
        if not (kinds & DLT_PROVIDERS) or not await self.references.reaches_india(spec.audience):
            return
        if not spec.sms.dlt_template_id:
            raise FailedPrecondition(
                name,
                f"campaign.sms.dlt_template_id is required: {name} sends to +91 numbers through "
                f"{', '.join(sorted(kinds & DLT_PROVIDERS))}, and India's DLT rules need the approved "
                "template's id",
            )
        if no_entity:
            raise FailedPrecondition(
                name,
                f"{name} sends to +91 numbers through {', '.join(no_entity)}, which has no "
                "dlt_entity_id: India's DLT rules need the principal entity's id",
            )

    async def stop(self, name: str) -> pb.Campaign:
        """Stops the campaign (its pending runs are cancelled), then has dispatch halt its
        deliveries on every replica: once this returns, no new provider request of it starts.
        Stopping a stopped campaign halts again, so a stop whose halt failed can be retried."""
        async with self.database.transaction() as session:
            row = await self._locked(session, name)
            if row.state != state_name(State.STATE_STOPPED):
                _stoppable(name, row.state)
                row = await set_state(session, self.subjects, row.id, State.STATE_STOPPED)
        self._notify()
        await self.references.halt_deliveries(name)
        return campaign_message(row)
