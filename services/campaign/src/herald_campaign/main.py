"""Campaign service process."""

from __future__ import annotations

from pathlib import Path

import grpc

from herald.accounts.v1 import account_service_pb2_grpc as accounts_grpc
from herald.campaign.v1 import campaign_service_pb2 as pb
from herald.campaign.v1 import campaign_service_pb2_grpc as pb_grpc
from herald_campaign.accounts import PERMISSIONS as ACCOUNT_PERMISSIONS
from herald_campaign.accounts import SERVICE_NAME as ACCOUNT_SERVICE_NAME
from herald_campaign.accounts import Accounts, AccountServicer
from herald_campaign.alerts import AlertWebhooks
from herald_campaign.consumers import start_consumers
from herald_campaign.explanation import Explanations
from herald_campaign.goals import Conversions
from herald_campaign.lifecycle import Lifecycle
from herald_campaign.previews import Previews
from herald_campaign.references import References
from herald_campaign.results import Results
from herald_campaign.servicer import PERMISSIONS, CampaignServicer
from herald_campaign.storage import SCHEMA, outbox
from herald_common import runtime
from herald_common.netguard import NetworkPolicy
from herald_common.runtime import Infrastructure, ServiceHost
from herald_common.settings import Settings

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CampaignService"].full_name
MIGRATIONS = Path(__file__).parent / "migrations"


async def start(settings: Settings, port: int | None = None) -> ServiceHost:
    infra = await Infrastructure.open(
        settings, service="campaign", schema=SCHEMA, migrations_dir=MIGRATIONS, outbox=outbox
    )
    segmentation = infra.channel("segmentation")
    dispatch = infra.channel("dispatch")
    scheduler = infra.channel("scheduler")
    references = References(segmentation, dispatch, scheduler)
    lifecycle = Lifecycle(infra.database, infra.subjects, references, infra.relay.notify)
    results = Results(infra.database, infra.subjects, references, infra.relay.notify)
    servicer = CampaignServicer(
        lifecycle,
        Explanations(infra.database, references),
        Previews(infra.database, references, lifecycle),
        results,
    )
    network = NetworkPolicy(settings.allowed_destination_networks)
    account_servicer = AccountServicer(
        Accounts(infra.database, settings.namespace, infra.relay.notify, infra.keys, infra.key_uses, network),
        infra,
    )

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_CampaignServiceServicer_to_server(servicer, server)
        accounts_grpc.add_AccountServiceServicer_to_server(account_servicer, server)

    host = await ServiceHost.start(
        "campaign",
        infra,
        [SERVICE_NAME, ACCOUNT_SERVICE_NAME],
        register,
        settings.port("campaign") if port is None else port,
        permissions={**PERMISSIONS, **ACCOUNT_PERMISSIONS},
    )
    host.on_stop.extend([segmentation.close, dispatch.close, scheduler.close])
    await start_consumers(infra, results, Conversions(infra.database))
    webhooks = AlertWebhooks(infra, network)
    await webhooks.start()
    host.on_stop.append(webhooks.close)
    return host


def main() -> None:
    runtime.run(start)


if __name__ == "__main__":
    main()
