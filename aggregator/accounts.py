"""Accounts: the set of member accounts to inventory, each with the role we assume in it.

Sources, merged in this order (a later source never overrides an earlier one for the same id):
`[[accounts.list]]` entries (their own role ARN and external id), `accounts.ids` (role ARN built
from `role_name` and the partition), and Organizations discovery (issue-tracked separately).
`accounts.exclude` removes ids from every source.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import AccountsSettings

__all__ = ["Account", "role_arn", "static_accounts"]


@dataclass(frozen=True, slots=True)
class Account:
    """A member account and how to get into it."""

    account_id: str
    role_arn: str
    external_id: str | None = None
    partition: str = "aws"


def role_arn(account_id: str, role_name: str, partition: str = "aws") -> str:
    """`arn:<partition>:iam::<account_id>:role/<role_name>`."""
    return f"arn:{partition}:iam::{account_id}:role/{role_name}"


def _partition_of(arn: str) -> str:
    return arn.split(":", 2)[1]


def static_accounts(settings: AccountsSettings) -> tuple[Account, ...]:
    """The accounts named in the configuration, excluded ids removed, sorted by id."""
    excluded = set(settings.exclude)
    default_external = settings.external_id or None
    found: dict[str, Account] = {}
    for entry in settings.list:
        if entry.id in excluded or entry.id in found:
            continue
        arn = entry.role_arn or role_arn(entry.id, settings.role_name, settings.partition)
        found[entry.id] = Account(
            account_id=entry.id,
            role_arn=arn,
            external_id=entry.external_id if entry.external_id is not None else default_external,
            partition=_partition_of(arn),
        )
    for account_id in settings.ids:
        if account_id in excluded or account_id in found:
            continue
        found[account_id] = Account(
            account_id=account_id,
            role_arn=role_arn(account_id, settings.role_name, settings.partition),
            external_id=default_external,
            partition=settings.partition,
        )
    return tuple(sorted(found.values(), key=lambda a: a.account_id))
