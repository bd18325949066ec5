"""Debian's message catalogs as real parallel text: English source strings with their human translations.

Every program that speaks several languages installs `/usr/share/locale/<lang>/LC_MESSAGES/<domain>.mo`:
a table from each English message (the msgid) to its translation. Read with the standard library's
`gettext`, a catalog gives (English source, translation) pairs; its domain (git, coreutils, gnupg2…) names
the software the message comes from, a label that survives translation.

Filters, so that what is left is prose a model can classify: at least `min_words` words in the English
source; no catalogs of names (iso-codes' countries, languages, currencies; keyboard layouts; time zones);
no plural forms or message contexts (kept as one entry without the context); no string that is a bare
format or option list; keyboard mnemonics (`_Open`, `&Open`) removed. An English string found in more than
one catalog (gnulib's shared messages, for instance) has no single label and is dropped.
"""

from __future__ import annotations

import gettext
import logging
import re
import struct
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from posthoc.errors import DataError

log = logging.getLogger(__name__)

LOCALE_DIR = Path("/usr/share/locale")
# Catalogs of names rather than messages: translations of place names, languages, currencies, layouts.
NAME_CATALOGS = re.compile(r"^(iso_|iso-|xkeyboard-config|tzdata|xdg-user-dirs|shared-mime-info)")
# The Debian package that installs a catalog, for the catalogs recipes use (`dpkg -S` finds any other).
KNOWN_PACKAGES = {
    "coreutils": "coreutils",
    "git": "git",
    "gnupg2": "gnupg-l10n",
    "gtk20-properties": "libgtk2.0-common",
    "gtk20": "libgtk2.0-common",
    "postgres-15": "postgresql-15",
    "glib20": "libglib2.0-data",
    "apt": "apt",
    "dpkg": "dpkg",
    "bash": "bash",
    "tar": "tar",
    "grep": "grep",
    "sed": "sed",
    "findutils": "findutils",
    "wget": "wget",
    "systemd": "systemd",
    "libc": "libc-l10n",
}
WORD = re.compile(r"[^\W\d_]{2,}", re.UNICODE)
MNEMONIC = re.compile(r"(?<![\w_])[_&](?=\w)")


@dataclass(frozen=True)
class Message:
    """One English message, the catalog (software) it comes from, and its translations by language."""

    source: str
    domain: str
    translations: dict[str, str]


def catalog_domains(language: str, locale_dir: Path = LOCALE_DIR) -> list[str]:
    """The message catalogs installed for a language (sorted domain names)."""
    folder = locale_dir / language / "LC_MESSAGES"
    return sorted(p.stem for p in folder.glob("*.mo")) if folder.is_dir() else []


def debian_package(domain: str, locale_dir: Path = LOCALE_DIR) -> str:
    """The Debian package that installs a catalog: asked of dpkg for any language that has it, else known."""
    for path in sorted(locale_dir.glob(f"*/LC_MESSAGES/{domain}.mo"))[:3]:
        try:
            out = subprocess.run(["dpkg", "-S", str(path)], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            break
        if out.returncode == 0 and ":" in out.stdout:
            return out.stdout.split(":", 1)[0].strip()
    return KNOWN_PACKAGES.get(domain, domain)


def _installed(package: str) -> bool:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "install ok installed" in out.stdout


def _missing_error(language: str, domains: Sequence[str], locale_dir: Path) -> DataError:
    packages = {d: debian_package(d, locale_dir) for d in domains}
    to_install = sorted({p for p in packages.values() if not _installed(p)})
    without = sorted(d for d, p in packages.items() if p not in to_install)
    where = f"{locale_dir}/{language}/LC_MESSAGES"
    parts = [f"no messages installed for language {language!r} from catalog(s) {', '.join(domains)} in {where}"]
    if to_install:
        parts.append(
            f"install the Debian package(s) that carry them: `apt-get install {' '.join(to_install)}` "
            "(and check that dpkg does not exclude /usr/share/locale, e.g. in /etc/dpkg/dpkg.cfg.d/)"
        )
    if without:
        names = ", ".join(f"{d} ({packages[d]})" for d in without)
        reinstall = " ".join(sorted({packages[d] for d in without}))
        parts.append(
            f"installed package(s) {names} carry no {language!r} translation there: choose another language or "
            f"catalog, or, if dpkg was told to skip translations (a path-exclude of /usr/share/locale in "
            f"/etc/dpkg/dpkg.cfg.d/), remove that line and `apt-get install --reinstall {reinstall}`"
        )
    return DataError("; ".join(parts))


def require_catalogs(languages: Sequence[str], domains: Sequence[str], locale_dir: Path = LOCALE_DIR) -> None:
    """Raise the DataError that names the Debian packages to install when a language lacks one of `domains`.

    Cheap (it only looks for the files): tests call it to skip with that message on a machine without them.
    """
    for language in languages:
        if language == "en":  # English sources: a catalog of any language carries them
            missing = [d for d in domains if not any(locale_dir.glob(f"*/LC_MESSAGES/{d}.mo"))]
        else:
            missing = [d for d in domains if not (locale_dir / language / "LC_MESSAGES" / f"{d}.mo").is_file()]
        if missing:
            raise _missing_error(language, missing, locale_dir)


def clean(text: str) -> str:
    """One line, mnemonics removed, whitespace collapsed."""
    text = MNEMONIC.sub("", text.replace("\r", " ").replace("\n", " ").replace("\t", " "))
    return " ".join(text.split())


def read_catalog(path: Path) -> dict[str, str]:
    """Cleaned msgid -> translation of one .mo file (singular messages; a context prefix is removed)."""
    try:
        with open(path, "rb") as handle:
            catalog = gettext.GNUTranslations(handle)._catalog
    except (OSError, UnicodeDecodeError, struct.error) as error:
        raise DataError(f"{path}: not a readable message catalog ({error})") from None
    out = {}
    for key, value in catalog.items():
        if not isinstance(key, str) or not key or not value:
            continue  # header, plural forms
        out[clean(key.split("\x04", 1)[-1])] = value
    return out


def keep(source: str, min_words: int) -> bool:
    """Prose, not a name, an option list or a format string."""
    words = WORD.findall(source)
    if len(words) < min_words:
        return False
    letters = sum(len(w) for w in words)
    return letters >= 0.5 * len(source.replace(" ", ""))  # mostly words, not %s, --options or paths


def load_messages(
    languages: Sequence[str],
    *,
    domains: Sequence[str] | None = None,
    exclude_domains: Iterable[str] = (),
    min_words: int = 4,
    require_all: bool = True,
    locale_dir: Path = LOCALE_DIR,
) -> list[Message]:
    """Messages with their translations into `languages`, sorted by (domain, source).

    `domains`: the catalogs to read (default: every message catalog of the first language, names catalogs
    excluded); `require_all`: keep only messages translated into every language (parallel text); otherwise
    a message is kept with the translations it has. Raises DataError naming the Debian package to install
    when a language has none of the asked catalogs.
    """
    if not languages:
        raise DataError("name at least one language (e.g. de, fr, ru)")
    exclude = set(exclude_domains)
    explicit = domains is not None
    if domains is None:
        others = [lang for lang in languages if lang != "en"]
        found = {d for lang in others for d in catalog_domains(lang, locale_dir)} if others else {
            p.stem for p in locale_dir.glob("*/LC_MESSAGES/*.mo")
        }
        domains = sorted(d for d in found if not NAME_CATALOGS.match(d))
    domains = [d for d in domains if d not in exclude]
    tables = _translation_tables(languages, domains, require_all=require_all, explicit=explicit, locale_dir=locale_dir)
    owners = _source_owners(tables, domains, locale_dir)

    messages = []
    for source_clean, owner in owners.items():
        if len(owner) != 1 or not keep(source_clean, min_words):
            continue
        domain = next(iter(owner))
        translations = {"en": source_clean} if "en" in languages else {}
        for language, by_domain in tables.items():
            catalog = by_domain.get(domain, {})
            hit = catalog.get(source_clean)
            if hit is not None:
                translations[language] = clean(hit)
        if require_all and any(lang not in translations for lang in languages):
            continue
        if len(translations) == 0:
            continue
        messages.append(Message(source_clean, domain, translations))
    if not messages:
        raise DataError(f"no messages with >= {min_words} words in catalog(s) {', '.join(domains)} for {', '.join(languages)}")
    return sorted(messages, key=lambda m: (m.domain, m.source))


def _translation_tables(
    languages: Sequence[str], domains: list[str], *, require_all: bool, explicit: bool, locale_dir: Path
) -> dict[str, dict[str, dict[str, str]]]:
    """language -> domain -> source -> translation, for every language but English (the sources are English).

    A catalog that cannot be read is skipped with a warning, unless the caller named the domains."""
    tables: dict[str, dict[str, dict[str, str]]] = {}
    for language in languages:
        if language == "en":
            continue
        present = [d for d in domains if (locale_dir / language / "LC_MESSAGES" / f"{d}.mo").is_file()]
        if not present or (require_all and len(present) < len(domains)):
            missing = [d for d in domains if d not in present]
            raise _missing_error(language, missing or domains, locale_dir)
        tables[language] = {}
        for domain in present:
            try:
                tables[language][domain] = read_catalog(locale_dir / language / "LC_MESSAGES" / f"{domain}.mo")
            except DataError:
                if explicit:
                    raise
                log.warning("skipping %s/%s.mo: not readable (a wrong charset in its header?)", language, domain)
    return tables


def _source_owners(
    tables: dict[str, dict[str, dict[str, str]]], domains: list[str], locale_dir: Path
) -> dict[str, set[str]]:
    """English source -> the domains (catalogs) it occurs in."""
    owners: dict[str, set[str]] = {}
    for by_domain in tables.values():
        for domain, catalog in by_domain.items():
            for source in catalog:
                owners.setdefault(source, set()).add(domain)
    if not tables:  # English only: English sources of every catalog, from whichever language has it
        for domain in domains:
            path = next(iter(sorted(locale_dir.glob(f"*/LC_MESSAGES/{domain}.mo"))), None)
            if path is None:
                raise _missing_error("en", [domain], locale_dir)
            for source in read_catalog(path):
                owners.setdefault(source, set()).add(domain)
    return owners


def message_triples(language: str, **kwargs: object) -> list[tuple[str, str, str]]:
    """(English source, translation, catalog) for one language: the reader's simplest view."""
    messages = load_messages(["en", language], **kwargs)  # type: ignore[arg-type]
    return [(m.source, m.translations[language], m.domain) for m in messages]
