"""The kinds of destination Herald delivers to, as every service needs to know them.

Each kind names its destination type (the job subject and the worker type), the Campaign content
field it delivers and the Destination config field that configures it, and which profile
attributes its content needs. How a kind sends is dispatch's business
(`herald_dispatch.channels`); adding a kind is one entry here and one module there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald_common import personalization


@dataclass(frozen=True)
class ChannelKind:
    destination_type: str
    content_field: str
    config_field: str
    destination_enum: dispatch_pb.DestinationType.ValueType
    # Profile properties a recipient's message is built from.
    attribute_keys: Callable[[campaign_pb.Campaign], set[str]]
    # Who of an audience this kind can reach.
    audience_channel: segmentation_pb.Channel.ValueType
    # Which of the account's frequency caps counts its messages.
    cap_channel: accounts_pb.CapChannel.ValueType
    # An accepted delivery is a notification delivered (an export); otherwise a receipt says so.
    accepted_is_delivered: bool = False


def _push_tokens(selection: campaign_pb.PushTokenSelection) -> set[str]:
    return {"devices"} if selection.gcm or selection.apns else set()


def _segment_export_attributes(campaign: campaign_pb.Campaign) -> set[str]:
    export = campaign.segment_export
    needed = personalization.profile_properties(export.custom_properties.values())
    return needed | set(export.profile_attributes) | _push_tokens(export.push_tokens)


def _mparticle_export_attributes(campaign: campaign_pb.Campaign) -> set[str]:
    export = campaign.mparticle_export
    needed = personalization.profile_properties(export.custom_attributes.values())
    # Email and phone also identify the user to mParticle (user_identities).
    identities = {"email", "phone"}
    return needed | set(export.profile_attributes) | identities | _push_tokens(export.push_tokens)


def _sms_attributes(campaign: campaign_pb.Campaign) -> set[str]:
    return personalization.profile_properties([campaign.sms.body]) | {"phone"}


_SEGMENT = ChannelKind(
    destination_type="segment",
    content_field="segment_export",
    config_field="segment",
    destination_enum=dispatch_pb.DestinationType.DESTINATION_TYPE_SEGMENT,
    attribute_keys=_segment_export_attributes,
    audience_channel=segmentation_pb.Channel.CHANNEL_SEGMENT,
    cap_channel=accounts_pb.CapChannel.CAP_CHANNEL_SEGMENT,
    accepted_is_delivered=True,
)


_MPARTICLE = ChannelKind(
    destination_type="mparticle",
    content_field="mparticle_export",
    config_field="mparticle",
    destination_enum=dispatch_pb.DestinationType.DESTINATION_TYPE_MPARTICLE,
    attribute_keys=_mparticle_export_attributes,
    audience_channel=segmentation_pb.Channel.CHANNEL_MPARTICLE,
    cap_channel=accounts_pb.CapChannel.CAP_CHANNEL_MPARTICLE,
    accepted_is_delivered=True,
)


def popup_templates(popup: campaign_pb.WebPopupContent) -> list[str]:
    """The templated texts of a pop-up's messages, its variants' included."""
    messages = [popup.message, *(variant.message for variant in popup.variants)]
    return [text for m in messages for text in (m.title, m.body, m.button.text)]


def _web_popup_attributes(campaign: campaign_pb.Campaign) -> set[str]:
    popup = campaign.web_popup
    needed = personalization.profile_properties(popup_templates(popup))
    return needed | ({popup.variant_property} if popup.variant_property else set())


_WEB_POPUP = ChannelKind(
    destination_type="web_popup",
    content_field="web_popup",
    config_field="web_popup",
    destination_enum=dispatch_pb.DestinationType.DESTINATION_TYPE_WEB_POPUP,
    attribute_keys=_web_popup_attributes,
    audience_channel=segmentation_pb.Channel.CHANNEL_WEB_POPUP,
    cap_channel=accounts_pb.CapChannel.CAP_CHANNEL_WEB_POPUP,
)


def _sms(provider: str, destination_enum: dispatch_pb.DestinationType.ValueType) -> ChannelKind:
    """Every SMS provider takes the same content and reaches the same users."""
    return ChannelKind(
        destination_type=provider,
        content_field="sms",
        config_field=provider,
        destination_enum=destination_enum,
        attribute_keys=_sms_attributes,
        audience_channel=segmentation_pb.Channel.CHANNEL_SMS,
        cap_channel=accounts_pb.CapChannel.CAP_CHANNEL_SMS,
    )


KINDS = (
    _SEGMENT,
    _MPARTICLE,
    _sms("twilio", dispatch_pb.DestinationType.DESTINATION_TYPE_TWILIO),
    _sms("vonage", dispatch_pb.DestinationType.DESTINATION_TYPE_VONAGE),
    _sms("msg91", dispatch_pb.DestinationType.DESTINATION_TYPE_MSG91),
    _sms("exotel", dispatch_pb.DestinationType.DESTINATION_TYPE_EXOTEL),
    _sms("netcore", dispatch_pb.DestinationType.DESTINATION_TYPE_NETCORE),
    _sms("sms_provider_group", dispatch_pb.DestinationType.DESTINATION_TYPE_SMS_PROVIDER_GROUP),
    _WEB_POPUP,
)

_BY_CONFIG = {kind.config_field: kind for kind in KINDS}
_BY_TYPE = {kind.destination_type: kind for kind in KINDS}
_BY_ENUM: dict[int, ChannelKind] = {int(kind.destination_enum): kind for kind in KINDS}


def for_content(content_field: str) -> list[ChannelKind]:
    """The kinds of destination that take this content."""
    return [kind for kind in KINDS if kind.content_field == content_field]


def for_config(config_field: str) -> ChannelKind:
    return _BY_CONFIG[config_field]


def for_destination_type(value: int) -> ChannelKind | None:
    return _BY_ENUM.get(value)


def of_type(destination_type: str) -> ChannelKind | None:
    return _BY_TYPE.get(destination_type)


def of_campaign(campaign: campaign_pb.Campaign) -> ChannelKind:
    """The kind of the campaign's destination (KeyError when it has none Herald delivers)."""
    if campaign.destination_type:
        return _BY_TYPE[campaign.destination_type]
    # Saved before campaigns recorded their destination's kind: only Segment exports existed.
    kinds = for_content(campaign.WhichOneof("content") or "")
    if len(kinds) != 1:
        raise KeyError(campaign.WhichOneof("content"))
    return kinds[0]
