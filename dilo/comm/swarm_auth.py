"""Who may take part in a swarm: the run key, peer tokens, signed DHT records, settings.

Threat model (see docs/swarm.md). libp2p encrypts every connection (TLS 1.3 / Noise) and
authenticates each end's peer id (the hash of its public key), so a message that arrives
from peer X was sent by whoever holds X's private key and was not read on the way. The run
key adds *membership*:

- every RPC carries `token(sender) = HMAC(key, peer id of the sender)`; the receiver
  checks it against the peer id libp2p authenticated, so a token is useless to any other
  peer. Without the key a peer cannot join a round, send a contribution, or download the
  global state, and every answer it gets says so;
- every DHT record of the run is HMAC-signed over (key, subkey, value, expiration); nodes
  refuse unsigned or forged records, so an outsider cannot fake members or donors;
- the run's DHT keys are derived from the key, so outsiders do not even learn them.

Every key holder is trusted: a member can send a wrong (finite, right-sized) contribution
or lie about its state, which the per-round digest comparison detects but cannot punish.
Without a key (`peers.open = true`) anyone who can reach a peer can join and read θ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import struct
from pathlib import Path

os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")  # before hivemind's first import: quiet by default

from hivemind.dht.validation import DHTRecord, RecordValidatorBase  # noqa: E402

KEY_ENV = "DILO_RUN_KEY"
MIN_KEY_CHARS = 16
_SIG_MARK = b"dilo-hmac:"
_SIG_LEN = len(_SIG_MARK) + 32


class AuthError(Exception):
    """A peer without the run key, or with other run settings."""


def load_key(key_file: str, open_swarm: bool) -> bytes | None:
    """The run key from peers.key_file, else $DILO_RUN_KEY; None only for an open swarm."""
    if key_file:
        path = Path(key_file).expanduser()
        try:
            key = path.read_bytes().strip()
        except OSError as e:
            raise ValueError(f"peers.key_file={key_file}: cannot read the run key ({e.strerror})") from None
        source = f"peers.key_file={key_file}"
    elif os.environ.get(KEY_ENV):
        key, source = os.environ[KEY_ENV].strip().encode(), f"${KEY_ENV}"
    elif open_swarm:
        return None
    else:
        raise ValueError(f"comm.backend = hivemind needs a run key: put one in a file and pass "
                         f"--peers.key_file FILE (or set {KEY_ENV}); e.g. `openssl rand -hex 32 > run.key`. "
                         "To run without one (anyone who reaches the swarm can join it), set peers.open = true")
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(f"{source}: the run key has {len(key)} characters; use at least {MIN_KEY_CHARS} "
                         "(e.g. `openssl rand -hex 32`)")
    return key


class RunAuth:
    """The run key's uses: namespace, peer tokens, record signatures."""

    def __init__(self, key: bytes | None):
        self.key = key

    @property
    def is_open(self) -> bool:
        return self.key is None

    def _mac(self, purpose: bytes, data: bytes) -> bytes:
        assert self.key is not None
        return hmac.new(self.key, purpose + b"\0" + data, hashlib.sha256).digest()

    @property
    def namespace(self) -> str:
        """Prefix of the run's DHT keys (no dots: hivemind reserves them)."""
        if self.key is None:
            return "dilo-open"
        return "dilo-" + self._mac(b"namespace", b"").hex()[:24]

    def token(self, peer_id: bytes) -> bytes:
        return b"" if self.key is None else self._mac(b"peer", peer_id)

    def check(self, peer_id: bytes, token: bytes) -> bool:
        return self.key is None or hmac.compare_digest(self.token(peer_id), token or b"")

    def validator(self) -> RecordValidatorBase | None:
        return None if self.key is None else _SignedRecords(self)


class _SignedRecords(RecordValidatorBase):
    """HMAC over the whole record; records of other keys (or none) are refused."""

    def __init__(self, auth: RunAuth):
        self._auth = auth

    @staticmethod
    def _serialize(record: DHTRecord) -> bytes:
        parts = (record.key, record.subkey, record.value)
        return b"".join(struct.pack("<Q", len(p)) + p for p in parts) + struct.pack("<d", record.expiration_time)

    def sign_value(self, record: DHTRecord) -> bytes:
        return record.value + _SIG_MARK + self._auth._mac(b"record", self._serialize(record))

    def validate(self, record: DHTRecord) -> bool:
        value = record.value
        if len(value) < _SIG_LEN or value[-_SIG_LEN:-32] != _SIG_MARK:
            return False
        stripped = dataclasses.replace(record, value=value[:-_SIG_LEN])
        return hmac.compare_digest(value[-32:], self._auth._mac(b"record", self._serialize(stripped)))

    def strip_value(self, record: DHTRecord) -> bytes:
        return record.value[:-_SIG_LEN]

    @property
    def priority(self) -> int:
        return 10


def settings_fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def settings_mismatch(mine: dict, theirs: dict, mine_is: str = "this peer", theirs_is: str = "other peer") -> str | None:
    """None if equal, else which shared settings differ, e.g. `model.d_model (this peer 32, other peer 64)`."""
    a, b = _flatten(mine), _flatten(theirs)
    diff = [f"{k} ({mine_is} {a.get(k)!r}, {theirs_is} {b.get(k)!r})"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diff) if diff else None
