"""Private networks: only DHT records signed by owner keys on an allowlist are stored or used.

An allowlist file lists libp2p peer ids (`12D3KooW...`, as `unode join` prints them), one per
line; `#` starts a comment. Set it with `unode join --allowlist FILE` or `UNODE_ALLOWLIST=FILE`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from node.errors import UserError
from protocol import codec
from protocol.errors import ProtocolError, SchemaError
from protocol.identity import peer_id_from_public_key, public_key_from_peer_id
from protocol.keys import parse_subkey
from protocol.validators import log_rejection

log = logging.getLogger(__name__)
ENV_ALLOWLIST = "UNODE_ALLOWLIST"


def read_allowlist(path: Path, flag: str = "--allowlist") -> frozenset[bytes]:
    """The Ed25519 public keys of the peer ids in `path`; a UserError for any bad line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(
            flag, str(path), "give a readable text file with one peer id per line", problem=str(err)
        ) from None
    keys = set()
    for number, line in enumerate(text.splitlines(), start=1):
        peer_id = line.split("#", 1)[0].strip()
        if not peer_id:
            continue
        try:
            keys.add(public_key_from_peer_id(peer_id))
        except SchemaError:
            raise UserError(
                flag,
                f"{path}:{number}: {peer_id}",
                "write one libp2p peer id (12D3KooW..., as `unode join` prints it) per line",
                problem="not an Ed25519 peer id",
            ) from None
    if not keys:
        raise UserError(flag, str(path), "list at least one peer id", problem="no peer id in it")
    return frozenset(keys)


def allowlist_from(path: Path | None) -> frozenset[bytes] | None:
    """The flag's file wins; otherwise $UNODE_ALLOWLIST; None means an open network."""
    if path is not None:
        return read_allowlist(Path(path))
    env = os.environ.get(ENV_ALLOWLIST, "").strip()
    return read_allowlist(Path(env), ENV_ALLOWLIST) if env else None


def check_own_key(allowlist: frozenset[bytes] | None, public_key: bytes) -> None:
    """A node off the allowlist would announce records that every member rejects: say so."""
    if allowlist is not None and public_key not in allowlist:
        raise UserError(
            "--allowlist",
            peer_id_from_public_key(public_key),
            "add this node's peer id to the allowlist file of every member",
            problem="this node is not on the allowlist",
        )


class AllowlistValidator(RecordValidatorBase):  # type: ignore[misc]  # hivemind is untyped
    """Rejects every record whose subkey does not name an allowlisted owner.

    hivemind runs it when a peer asks this node to store a record and on every record a peer
    returns to a lookup, next to `UnodeRecordValidator` (which binds the subkey's owner to the
    envelope's signature): an outsider's record never enters this node's storage or results.
    """

    def __init__(self, owners: frozenset[bytes]) -> None:
        self.owners = owners

    def validate(self, record: DHTRecord) -> bool:
        try:
            owner, _item = parse_subkey(codec.decode(record.subkey, max_bytes=512))
        except (ProtocolError, ValueError, TypeError) as err:
            log_rejection(log, "allowlist: rejected a record without an owner subkey: %s", err)
            return False
        if owner not in self.owners:
            log_rejection(
                log,
                "allowlist: rejected a record of %s (not on the allowlist)",
                peer_id_from_public_key(owner),
            )
            return False
        return True

    @property
    def priority(self) -> int:
        return 4  # after the schema/signature validator (5): it only reads the subkey

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


def allowlist_validators(owners: frozenset[bytes] | None) -> list[RecordValidatorBase]:
    """[] for an open network, else the one validator a private network adds."""
    return [] if owners is None else [AllowlistValidator(owners)]
