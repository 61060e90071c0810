"""`warmrelay hash-password` and `warmrelay dkim keygen`: secrets made for the configuration."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


def cmd_hash_password(args: argparse.Namespace) -> int:
    """Print an argon2id hash for smtp.users.NAME.password_hash (the password is read
    from standard input or a prompt, never from the command line)."""
    import getpass

    from warmrelay.smtp.auth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 12:
        print("use at least 12 characters", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    """Write a new DKIM private key (mode 0600; an existing file is never replaced) and
    print the TXT record to publish at SELECTOR._domainkey.DOMAIN on standard output."""
    from pathlib import Path

    from warmrelay.mail.dkim import keygen

    out = Path(args.out) if args.out else None
    try:
        domain, entry, record = keygen(args.domain, args.selector, args.algorithm, out)
    except ValueError as exc:
        print(f"dkim keygen: {exc}", file=sys.stderr)
        return 2
    except FileExistsError as exc:
        print(
            f"dkim keygen: {exc.filename} exists: not replaced (a published record may belong "
            "to it); choose another --out",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"dkim keygen: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    print(record)
    print(
        f"wrote {entry.key_file} (mode 0600). Publish the TXT record above, then add to the "
        f"configuration:\n  dkim:\n    domains:\n      {domain}:\n        keys:\n"
        f"          - {{selector: {entry.selector}, key_file: {entry.key_file}, "
        f"algorithm: {entry.algorithm}}}",
        file=sys.stderr,
    )
    return 0
