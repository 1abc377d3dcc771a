"""MSH-18 character sets (HL7 table 0211) as Python codecs.

In core because both the site config (``hl7v2.charset`` is checked at load)
and the ER7 reader need it, and the config sits below pipelines/.
"""

from __future__ import annotations

import codecs

from ehrbridge.core.bounded_cache import short_key_cache

# HL7 table 0211 (alternate character sets) -> Python codec. Labels are
# compared upper-cased with spaces and underscores removed.
_CHARSETS: dict[str, str] = {
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "UNICODE": "utf-8",
    "UNICODE UTF-8": "utf-8",
    "UNICODE UTF-16": "utf-16",
    "UNICODE UTF-32": "utf-32",
    "ISO IR192": "utf-8",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "ISO IR100": "latin-1",
    "ISO IR101": "iso8859-2",
    "ISO IR109": "iso8859-3",
    "ISO IR110": "iso8859-4",
    "ISO IR144": "iso8859-5",
    "ISO IR127": "iso8859-6",
    "ISO IR126": "iso8859-7",
    "ISO IR138": "iso8859-8",
    "ISO IR148": "iso8859-9",
    "ISO IR14": "iso2022-jp",
    "ISO IR87": "iso2022-jp",
    "ISO IR159": "iso2022-jp-1",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc-kr",
    "CNS 11643-1992": "big5",
    "BIG-5": "big5",
}
# Codecs that reinterpret pure-ASCII bytes (escape-sequence based), so an
# ASCII-only text still has to be decoded again with them.
ASCII_UNSAFE_PREFIXES = ("iso2022", "utf-16", "utf-32")


def _charset_key(label: str) -> str:
    # 'ISO IR192', 'ISO_IR 192' (DICOM spelling) and 'iso ir192' are the same label.
    return "".join(label.replace("_", " ").upper().split())


_CHARSET_KEYS = {_charset_key(label): codec for label, codec in _CHARSETS.items()}
_PROBE = "MSH|^~\\&"  # what every charset a message can be read in must keep as it is


@short_key_cache(maxsize=128, max_chars=64)  # MSH-18 is a short code; a long one is not kept
def codec_for_charset(charset: str) -> str | None:
    """The Python codec name for an MSH-18 value, or None if unknown or not a charset."""
    key = _charset_key(charset)
    # Senders also put plain codec names there ("UTF-8", "windows-1252").
    name = _CHARSET_KEYS.get(key, key)
    try:
        codec = codecs.lookup(name).name
        probe = _PROBE.encode(codec)
    except (LookupError, ValueError, UnicodeError):  # unknown, "UTF\x00-8", or not text
        return None
    if probe != _PROBE.encode("ascii") and not codec.startswith(ASCII_UNSAFE_PREFIXES):
        return None  # rewrites the delimiters (unicode_escape, punycode): not a charset
    return codec
