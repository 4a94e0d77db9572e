"""The SMTP service as a worker runs it: one group committer and one router per
worker, shared by the sessions of every SMTP listener."""

from __future__ import annotations

from ..config import Config, ListenAddress
from ..service import WorkerContext
from ..store.committer import GroupCommitter
from ..store.mailboxes import Router
from ..store.spool import check_queue_writable
from .session import SMTPSession


def router_for(config: Config) -> Router:
    return Router(config.domains, recipients=config.recipients, aliases=config.aliases,
                  catchall=config.catchall)


class SMTPService:
    def __init__(self, context: WorkerContext):
        self.context = context
        # Without a writable queue every message would get a 451: fail to start
        # instead (the master then stops with this error rather than fork-loop).
        check_queue_writable(context.config.spool_dir)
        self.config = context.config
        self.router = router_for(context.config)
        self.committer = GroupCommitter(context.config.spool_dir, context.notify_delivery,
                                        context.hooks.broken)

    def new_session(self, listener: ListenAddress) -> SMTPSession:
        return SMTPSession(self.context, listener, self.router, self.committer)

    async def close(self) -> None:
        await self.committer.drain()
        self.committer.close()
