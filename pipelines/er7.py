"""The lean ER7 (HL7v2 pipe-delimited) reader used on the hot path.

A full HL7 parser (hl7apy) builds a typed tree of every field and costs tens of
milliseconds per ORU^R01. The pipeline reads ~20 fields per message, so this
reader does the least work that can answer those reads:

* segments are split eagerly (one ``str.split``) and their names checked;
* a segment's fields are split the first time one of them is read;
* repetitions, components and subcomponents are split per read (``str.split``);
* escape sequences are decoded only when a value is read through
  :meth:`Segment.component`, :meth:`Segment.value` or :meth:`Message.get`.

Numbering follows HL7: for MSH, MSH-1 is the field separator itself and MSH-2
the encoding characters; for every other segment field *n* is the *n*-th after
the segment name. Components, repetitions and subcomponents are 1-based.

Tolerance policy (what is accepted, what is rejected with ``MessageRejected``):

* Segment separators: CR (the standard), LF and CRLF, mixed within a message.
  Blank and whitespace-only lines are ignored. An LF is therefore never data;
  a sender that wraps long lines (LF inside a field) produces a line with no
  segment name, which is rejected (``hl7.bad_segment``) -- hl7apy refuses those
  lines too, and guessing which line continues which would corrupt values.
* MLLP framing (VT at the start, FS/CR at the end), a UTF-8 BOM and leading
  whitespace are stripped. Trailing spaces inside the last field are kept:
  they are data as far as ER7 is concerned (hl7apy strips them).
* The message must start with ``MSH`` (``hl7.no_msh``). An input starting with
  ``FHS``/``BHS``, or holding a second ``MSH``/``FHS``/``BHS``/``BTS``/``FTS``,
  is a batch (``hl7.batch``): accepting it as one message would attach the
  second patient's results to the first. :func:`parse_batch` reads batches.
* Encoding characters come from MSH-1/MSH-2 and may be any printable
  characters that are not letters, digits or whitespace and are pairwise
  distinct (control characters such as 0x1C are refused). MSH-2 with one
  to three characters is completed with the standard ``^~\\&`` defaults for the
  missing positions (if a default would collide with a declared character the
  message is rejected). A fifth character is the v2.7 truncation character.
  Empty, duplicated, alphanumeric or over-long MSH-2 -> ``hl7.bad_encoding``.
* Segment names are three ASCII characters, uppercase letters or digits,
  starting with a letter (``PID``, ``PD1``, ``ZPI``); the name must be followed
  by the field separator or end the line (``NTE`` alone is a segment with no
  fields). A line indented with whitespace is accepted if the name is valid
  after stripping (hl7apy strips every segment). Anything else, including
  lowercase names (``pid|``), two-letter names (``PI|``) and wrapped
  continuation lines, -> ``hl7.bad_segment``.
* Bytes are decoded with the MSH-18 character set when it names one we know
  (``UNICODE UTF-8``, ``8859/2``, ``ISO IR144``, ``GB 18030-2000`` ...); otherwise
  UTF-8, falling back to latin-1. One exception: bytes labelled ``ASCII`` or
  ``8859/1`` that are valid UTF-8 are read as UTF-8 -- senders label UTF-8 that
  way by habit (the corpus has such ELR files), real latin-1 accents are almost
  never valid UTF-8, and a mis-decoded unit such as ``Âµmol/L`` would make the
  message unusable. If the declared codec cannot decode the bytes, the
  UTF-8/latin-1 reading is kept. Decoding never raises.

Escapes (:func:`unescape`): ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` (and ``\\P\\`` for the
v2.7 truncation character) become the delimiter; ``\\Xhh..\\`` becomes the
bytes decoded as UTF-8, else latin-1; formatting commands ``\\.br\\`` and
``\\.sp\\`` become newlines, ``\\.sk n\\`` n spaces, ``\\.ce\\`` a newline,
and ``\\H\\ \\N\\ \\.fi\\ \\.nf\\ \\.in\\ \\.ti\\`` are removed. Character-set
switches (``\\C..\\``, ``\\M..\\``), local ``\\Z..\\`` escapes and anything
unknown or unterminated are kept literally.

Caps (hostile input is normal input): ``\\.sk n\\`` and ``\\.sp n\\`` with n over
:data:`MAX_FORMAT_REPEAT`, or n not in ASCII digits, are refused
(``hl7.escape_too_long``); a value read through the accessors longer than
:data:`MAX_VALUE_CHARS` once decoded is refused (``hl7.field_too_long``). Both are
:class:`MessageUnusable` (AE), so nothing over a cap reaches patient state.
Every read is linear in the length of what it reads.

Error details name segments and positions only, never values (no PHI).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from functools import lru_cache
from typing import NoReturn

from ehrbridge.core.charsets import ASCII_UNSAFE_PREFIXES, codec_for_charset
from ehrbridge.core.errors import Hl7Location, MessageRejected, MessageUnusable

__all__ = [
    "DEFAULT_ENCODING",
    "MAX_FORMAT_REPEAT",
    "MAX_VALUE_CHARS",
    "Encoding",
    "Message",
    "Segment",
    "codec_for_charset",
    "decode_message",
    "decode_with_codec",
    "escape",
    "is_delimiter",
    "parse_batch",
    "read_encoding",
    "split_segments",
    "unescape",
]

_DEFAULT_MSH2 = "^~\\&"
# Longest value (decoded) the accessors return. Everything stored in patient state
# (ids, codes, displays, units, raw values) is read through them; a numeric result,
# a code or an identifier is far shorter, an embedded document (OBX-5 ED) is never read.
MAX_VALUE_CHARS = 65_536
# Largest n of the formatting escapes \.sk n\ and \.sp n\ (HL7 v2 2.7.6): a page
# is about 100 characters wide, and n = 2*10^8 once turned 1.4 KB into 400 MB of state.
MAX_FORMAT_REPEAT = 100
_LEADING_JUNK = "\ufeff\x0b \t\r\n"
_TRAILING_JUNK = "\x1c\r\n"
_ENVELOPE_NAMES = frozenset({"MSH", "FHS", "BHS", "BTS", "FTS"})


@dataclass(frozen=True, slots=True)
class Encoding:
    """The delimiters of one message, from MSH-1 and MSH-2."""

    field: str
    component: str
    repetition: str
    escape: str
    subcomponent: str
    truncation: str | None = None  # v2.7+ fifth MSH-2 character, usually '#'
    # Escape-sequence -> text table for unescape(), built once per Encoding
    # (hashing the dataclass on every escaped value would cost more than the lookup).
    _escapes: dict[str, str] = dataclass_field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        table = {
            "F": self.field,
            "S": self.component,
            "T": self.subcomponent,
            "R": self.repetition,
            "E": self.escape,
        }
        if self.truncation:
            table["P"] = self.truncation
        object.__setattr__(self, "_escapes", table)

    @property
    def msh2(self) -> str:
        """The encoding characters as MSH-2 carries them."""
        chars = self.component + self.repetition + self.escape + self.subcomponent
        return chars + (self.truncation or "")


DEFAULT_ENCODING = Encoding(field="|", component="^", repetition="~", escape="\\", subcomponent="&")


# --------------------------------------------------------------------------- escapes


def unescape(text: str, enc: Encoding) -> str:
    """Decode the escape sequences of one ER7 value (see the module docstring).

    Raises MessageUnusable (no location: the caller knows it) when a formatting
    escape or the decoded value is over a cap; the output is never built past
    :data:`MAX_VALUE_CHARS`.
    """
    esc = enc.escape
    if not esc or esc not in text:
        return text  # fast path: nearly every value
    parts = text.split(esc)
    # After the split, odd positions hold the text between two escape characters.
    out = [parts[0]]
    size = len(parts[0])
    last = len(parts) - 1
    i = 1
    while i <= last:
        if i == last:  # unterminated sequence: keep the escape character literally
            out.append(esc + parts[i])
            break
        decoded = _decode_sequence(parts[i], enc)
        size += len(decoded) + len(parts[i + 1])
        if size > MAX_VALUE_CHARS:
            raise value_too_long()
        out.append(decoded)
        out.append(parts[i + 1])
        i += 2
    return "".join(out)


def value_too_long(location: Hl7Location | None = None) -> MessageUnusable:
    """The error for a value over :data:`MAX_VALUE_CHARS` (HL7 table 0357 code 102)."""
    where = f"{location} is" if location else "a value is"
    return MessageUnusable(
        f"{where} longer than {MAX_VALUE_CHARS} characters",
        reason="hl7.field_too_long",
        location=location,
        hl7_error_code=102,
    )


def _decode_sequence(seq: str, enc: Encoding) -> str:
    """The text for one escape sequence body (between the escape characters)."""
    simple = enc._escapes.get(seq)
    if simple is not None:
        return simple
    head = seq[:1]
    if head == "X":
        return _decode_hex(seq, enc)
    if head == ".":
        return _decode_formatting(seq, enc)
    if seq in ("H", "N"):  # highlighting on/off: presentation only
        return ""
    return enc.escape + seq + enc.escape  # \C..\, \M..\, \Z..\ and unknown: literal


def _decode_hex(seq: str, enc: Encoding) -> str:
    digits = seq[1:]
    try:
        data = bytes.fromhex(digits)
    except ValueError:
        return enc.escape + seq + enc.escape
    if not data:
        return enc.escape + seq + enc.escape
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _decode_formatting(seq: str, enc: Encoding) -> str:
    command, argument = seq[1:3], seq[3:].strip()
    count = _repeat_count(argument) if command in ("sk", "sp") else 1
    if command == "br" and not argument:
        return "\n"
    if command == "sp":  # end the line and skip <count> vertical spaces
        return "\n" * max(count, 1)
    if command == "sk":  # skip <count> spaces to the right
        return " " * count
    if command == "ce":  # end the line and centre the next: we only end it
        return "\n"
    if command in ("fi", "nf", "in", "ti"):  # fill/indent modes: presentation only
        return ""
    return enc.escape + seq + enc.escape


def _repeat_count(argument: str) -> int:
    """n of \\.sk n\\ / \\.sp n\\ (1 when absent), refused above MAX_FORMAT_REPEAT.

    ASCII digits only: ``str.isdigit`` also takes '¹', which ``int`` refuses.
    """
    if not argument:
        return 1
    if not (argument.isascii() and argument.isdigit()) or len(argument) > 6:
        raise _bad_repeat()
    count = int(argument)
    if count > MAX_FORMAT_REPEAT:
        raise _bad_repeat()
    return count


def _bad_repeat() -> MessageUnusable:
    return MessageUnusable(
        f"a formatting escape (\\.sk n\\ or \\.sp n\\) has n that is not a number "
        f"from 0 to {MAX_FORMAT_REPEAT}",
        reason="hl7.escape_too_long",
        hl7_error_code=102,
    )


def escape(text: str, enc: Encoding) -> str:
    """Escape delimiters (and CR/LF) so that ``text`` can be written as one ER7 value."""
    return text.translate(_escape_table(enc))


def _delimiters(enc: Encoding) -> str:
    return enc.field + enc.msh2


@lru_cache(maxsize=64)
def _escape_table(enc: Encoding) -> dict[int, str]:
    esc = enc.escape
    table = {
        ord(enc.escape): f"{esc}E{esc}",
        ord(enc.field): f"{esc}F{esc}",
        ord(enc.component): f"{esc}S{esc}",
        ord(enc.subcomponent): f"{esc}T{esc}",
        ord(enc.repetition): f"{esc}R{esc}",
        ord("\r"): f"{esc}X0D{esc}",  # a raw CR would end the segment
        # A raw LF would end the segment too (LF separators are accepted). \.br\
        # is what FT readers expect, unless '.' is a delimiter of this message.
        ord("\n"): f"{esc}X0A{esc}" if "." in _delimiters(enc) else f"{esc}.br{esc}",
    }
    if enc.truncation:
        table[ord(enc.truncation)] = f"{esc}P{esc}"
    return table


# --------------------------------------------------------------------------- decoding


# Labels that senders put on UTF-8 by habit. Real latin-1 text with accents is
# almost never valid UTF-8 (an 'Ã' would have to precede a symbol such as '©'),
# so when the bytes decode as UTF-8 the label is the thing that is wrong.
_UTF8_WINS = frozenset({"ascii", "iso8859-1"})


def decode_message(raw: bytes | bytearray, charset: str = "utf-8") -> str:
    """Message bytes as text: MSH-18 charset if known, else ``charset``, else latin-1.

    Never raises.
    """
    return decode_with_codec(raw, charset)[0]


def decode_with_codec(raw: bytes | bytearray, charset: str = "utf-8") -> tuple[str, str]:
    """:func:`decode_message` and the codec that decoded the bytes.

    Encoding the text again with that codec gives back the bytes, so an ACK
    can echo MSH-10 byte for byte. ``charset`` is the site's default for
    messages without a (known) MSH-18, an HL7 table 0211 label or codec name.
    """
    data = raw if isinstance(raw, bytes) else bytes(raw)
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # UTF-16 with a BOM: MSH-18 unreadable before
        try:
            return data.decode("utf-16"), "utf-16"
        except UnicodeDecodeError:
            pass
    first = codec_for_charset(charset) or "utf-8"
    try:
        text, used = data.decode(first), first
    except UnicodeDecodeError:
        text, used = data.decode("latin-1"), "iso8859-1"  # codecs.lookup() spelling
    if text.isascii() and "\x1b" not in text:
        return text, used  # fast path: ASCII-compatible charsets all read these bytes alike
    declared = _msh18(text)
    if not declared:
        return text, used
    codec = codec_for_charset(declared)
    if codec is None or codec == used:
        return text, used
    if used == "utf-8" and codec in _UTF8_WINS:
        return text, used  # valid UTF-8 labelled ASCII/8859-1 is mislabelled UTF-8 (see docstring)
    if text.isascii() and not codec.startswith(ASCII_UNSAFE_PREFIXES):
        return text, used
    try:
        declared_text = data.decode(codec)
    except UnicodeError:  # UnicodeDecodeError, or a codec's own (iso2022 escapes)
        return text, used  # the declaration is wrong; keep the first reading
    if not _same_msh_fields(declared_text, text):
        return text, used  # so is this one (see _same_msh_fields)
    return declared_text, codec


def _msh18(text: str) -> str:
    """MSH-18 (first repetition, first component) of the first MSH, or ''."""
    line = _msh_line(text)
    sep = line[3:4]
    if not sep or line.count(sep) < 17:
        return ""
    fields = line.split(sep)  # fields[k] is MSH-(k+1)
    value = fields[17]
    msh2 = fields[1]
    if len(msh2) >= 2:  # first repetition, first component (delimiters not validated yet)
        value = value.split(msh2[1])[0].split(msh2[0])[0]
    return value.strip()


def _msh_line(text: str) -> str:
    """The first MSH line ('' if none): at the start, or at the start of a line (batch)."""
    start = 0 if text.lstrip(_LEADING_JUNK).startswith("MSH") else -1
    if start == 0:
        start = text.find("MSH")
    else:  # a batch: the first MSH at the start of a line
        starts = [i + 1 for i in (text.find("\rMSH"), text.find("\nMSH")) if i >= 0]
        start = min(starts) if starts else -1
    if start < 0:
        return ""
    return text[start : start + _line_end(text, start)]


def _same_msh_fields(declared: str, first: str) -> bool:
    """Whether the declared codec's reading splits MSH into the same fields as the first.

    GB 18030 and Big5 have trailing bytes in the ASCII range ('|' is 0x7C): a
    wrong declaration would swallow delimiters, and MSH-10 would be misread.
    """
    line, other = _msh_line(declared), _msh_line(first)
    return line[3:4] == other[3:4] and line.count(line[3:4]) == other.count(other[3:4])


def _line_end(text: str, start: int) -> int:
    """Length of the line that starts at ``start``."""
    cr, lf = text.find("\r", start), text.find("\n", start)
    end = len(text) if cr < 0 and lf < 0 else max(cr, lf) if cr < 0 or lf < 0 else min(cr, lf)
    return end - start


# --------------------------------------------------------------------------- splitting


def split_segments(raw: str) -> list[str]:
    """Split ER7 text into segment lines: CR, LF or CRLF; blank lines and MLLP framing dropped."""
    return [line for line in _split_lines(_strip_envelope(raw)) if not line.isspace()]


def _strip_envelope(text: str) -> str:
    # MLLP: <VT> message <FS><CR>; plus BOM and whitespace senders put around it.
    return text.lstrip(_LEADING_JUNK).rstrip(_TRAILING_JUNK)


def _split_lines(text: str) -> list[str]:
    if "\n" in text:
        text = text.replace("\r\n", "\r").replace("\n", "\r")
    lines = text.split("\r")
    if "" in lines:  # blank lines (CRCR, CRLF LF ...); whitespace-only ones are dropped later
        lines = [line for line in lines if line]
    return lines


# --------------------------------------------------------------------------- segment


class Segment:
    """One segment; fields are split on first access, values unescaped on read.

    The accessors are written flat (no helper chains) because they run ~20
    times per message on the hot path.
    """

    __slots__ = ("_enc", "_fields", "index", "name", "text")

    def __init__(self, name: str, index: int, text: str, enc: Encoding) -> None:
        self.name = name
        self.index = index  # 0-based position in the message
        self.text = text  # the raw ER7 line
        self._enc = enc
        self._fields: list[str] | None = None

    def __repr__(self) -> str:
        return f"<Segment {self.name} #{self.index}>"

    @property
    def encoding(self) -> Encoding:
        return self._enc

    def _split(self) -> list[str]:
        fields = self.text.split(self._enc.field)
        if self.name == "MSH":  # MSH-1 is the separator itself: make fields[n] == MSH-n
            fields.insert(1, self._enc.field)
        self._fields = fields
        return fields

    def __len__(self) -> int:
        return len(self._fields or self._split()) - 1

    def field(self, n: int) -> str:
        """Raw (still escaped) text of field n, '' if absent."""
        fields = self._fields or self._split()
        if n < 1:
            raise ValueError(f"HL7 field numbers start at 1, got {n}")
        return fields[n] if n < len(fields) else ""

    def fields(self) -> list[str]:
        """Raw text of fields 1..len(self)."""
        return (self._fields or self._split())[1:]

    def repetitions(self, n: int) -> list[str]:
        """Raw repetitions of field n; [] if the field is empty or absent."""
        text = self.field(n)
        if not text:
            return []
        if n <= 2 and self.name == "MSH":  # MSH-1/MSH-2 hold delimiters: never split
            return [text]
        return text.split(self._enc.repetition)

    def _repetition(self, n: int, rep: int) -> str:
        """Raw text of repetition ``rep`` of field n ('' if absent)."""
        fields = self._fields or self._split()
        if n < 1 or rep < 1:
            raise ValueError(f"HL7 field and repetition numbers start at 1, got {n}({rep})")
        if n >= len(fields):
            return ""
        text = fields[n]
        if not text or (n <= 2 and self.name == "MSH"):
            return text if rep == 1 else ""
        sep = self._enc.repetition
        if rep == 1:
            cut = text.find(sep)
            return text if cut < 0 else text[:cut]
        parts = text.split(sep)
        return parts[rep - 1] if rep <= len(parts) else ""

    def components(self, n: int, rep: int = 1) -> list[str]:
        """Raw components of repetition ``rep`` of field n; [] if empty or absent."""
        text = self._repetition(n, rep)
        if not text:
            return []
        if n <= 2 and self.name == "MSH":
            return [text]
        return text.split(self._enc.component)

    def raw_component(self, n: int, comp: int = 1, rep: int = 1, sub: int | None = None) -> str:
        """Like :meth:`component` but still escaped."""
        fields = self._fields or self._split()
        if n < 1 or rep < 1 or comp < 1 or (sub is not None and sub < 1):
            raise ValueError(f"HL7 positions start at 1, got {n}({rep}).{comp}.{sub}")
        if n >= len(fields):
            return ""
        text = fields[n]
        if not text:
            return ""
        if n <= 2 and self.name == "MSH":  # delimiters: one value, never split
            return text if rep == 1 and comp == 1 and sub in (None, 1) else ""
        enc = self._enc
        # repetition
        sep = enc.repetition
        if rep == 1:
            cut = text.find(sep)
            if cut >= 0:
                text = text[:cut]
        else:
            parts = text.split(sep)
            text = parts[rep - 1] if rep <= len(parts) else ""
        # component
        sep = enc.component
        if comp == 1:
            cut = text.find(sep)
            if cut >= 0:
                text = text[:cut]
        else:
            parts = text.split(sep)
            text = parts[comp - 1] if comp <= len(parts) else ""
        if sub is None:
            return text
        # subcomponent
        sep = enc.subcomponent
        if sub == 1:
            cut = text.find(sep)
            return text if cut < 0 else text[:cut]
        parts = text.split(sep)
        return parts[sub - 1] if sub <= len(parts) else ""

    def component(self, n: int, comp: int = 1, rep: int = 1, sub: int | None = None) -> str:
        """Unescaped value of field n, repetition rep, component comp (subcomponent sub)."""
        return self.decode(n, self.raw_component(n, comp, rep, sub))

    def value(self, n: int) -> str:
        """Unescaped whole field n (first repetition); delimiters inside stay as they are."""
        return self.decode(n, self._repetition(n, 1))

    def rep_value(self, n: int, rep: int) -> str:
        """Unescaped whole repetition ``rep`` of field n."""
        return self.decode(n, self._repetition(n, rep))

    def decode(self, n: int, text: str) -> str:
        """``text`` (raw, read from field n) unescaped, within the caps of the module docstring."""
        if n <= 2 and self.name == "MSH":  # delimiters: never escaped
            return text
        if self._enc.escape in text:
            try:
                text = unescape(text, self._enc)
            except MessageUnusable as error:
                raise MessageUnusable(
                    error.detail,
                    reason=error.reason,
                    location=self._location(n),
                    hl7_error_code=error.hl7_error_code,
                ) from None
        if len(text) > MAX_VALUE_CHARS:
            raise value_too_long(self._location(n))
        return text

    def repetition_components(self, n: int) -> list[list[str]]:
        """Raw components of every repetition of field n, splitting the field once.

        For repeating fields read repetition by repetition (PID-3): reading
        them one :meth:`component` call at a time re-splits the field per call,
        which is quadratic in the number of repetitions.
        """
        return [rep.split(self._enc.component) for rep in self.repetitions(n)]

    def _location(self, n: int) -> Hl7Location:
        return Hl7Location(self.name, field=n)


# --------------------------------------------------------------------------- message


_VALID_NAMES: set[str] = set()  # cache of names already checked (bounded: 3-char names)


def _is_segment_name(name: str) -> bool:
    return (
        len(name) == 3
        and name.isascii()
        and name.isalnum()
        and name.isupper()
        and name[0].isalpha()
    )


def _safe_name(line: str) -> str:
    """The name to report for a bad line: only if it looks like one (never values)."""
    name = line[:3]
    return name if _is_segment_name(name) else "???"


class Message:
    """A parsed ER7 message: an ordered list of lazily split segments."""

    __slots__ = ("_names", "encoding", "segments")

    def __init__(self, encoding: Encoding, segments: list[Segment]) -> None:
        self.encoding = encoding
        self.segments = segments  # in message order; treat as read-only
        self._names: list[str] | None = None  # built on the first lookup by name

    def __repr__(self) -> str:
        return f"<Message {'^'.join(self.message_type)} {len(self.segments)} segments>"

    @classmethod
    def parse(cls, raw: bytes | bytearray | str, charset: str = "utf-8") -> Message:
        """Parse one message. Raises MessageRejected (see module docstring for the policy).

        ``charset`` decodes bytes without a (known) MSH-18: the site's default.
        """
        text = raw if isinstance(raw, str) else decode_message(raw, charset)
        text = _strip_envelope(text)
        if not text.startswith("MSH"):
            if text.startswith(("FHS", "BHS")):
                raise MessageRejected(
                    "input is an HL7 batch (FHS/BHS header), not a single message",
                    reason="hl7.batch",
                    location=Hl7Location(text[:3]),
                )
            raise MessageRejected(
                "message does not start with an MSH segment",
                reason="hl7.no_msh",
                location=Hl7Location("MSH"),
            )
        lines = _split_lines(text)
        return cls._from_lines(lines, read_encoding(lines[0]))

    @classmethod
    def _from_lines(cls, lines: list[str], enc: Encoding) -> Message:
        segments = [Segment("MSH", 0, lines[0], enc)]
        append = segments.append
        fs = enc.field
        valid = _VALID_NAMES
        for line in lines[1:]:
            name = line[:3]
            if line[3:4] == fs and name in valid:  # the common case: a name seen before
                append(Segment(name, len(segments), line, enc))
            elif not line.isspace():  # whitespace-only lines between segments are skipped
                checked = _checked_line(line, len(segments), fs)
                append(Segment(checked[:3], len(segments), checked, enc))
        return cls(enc, segments)

    # -- navigation ------------------------------------------------------------

    def segment(self, name: str, occurrence: int = 1) -> Segment | None:
        """The ``occurrence``-th (1-based) segment called ``name``, or None."""
        names = self._names
        if names is None:
            names = self._names = [seg.name for seg in self.segments]
        if occurrence < 1:
            return None
        try:
            i = names.index(name)
            for _ in range(occurrence - 1):
                i = names.index(name, i + 1)
        except ValueError:
            return None
        return self.segments[i]

    def all(self, name: str) -> list[Segment]:
        """Every segment called ``name``, in message order."""
        return [seg for seg in self.segments if seg.name == name]

    def get(self, path: str) -> str:
        """Unescaped value at a path such as ``PID-3``, ``PID-3.4``, ``PID-3(2).4.1``, ``OBX[2]-5``.

        ``SEG[k]`` selects the k-th occurrence (default first), ``(r)`` the
        repetition (default first). A whole field or component is returned
        with any inner delimiters as they are. Absent -> ''.
        """
        name, occurrence, n, rep, comp, sub = _parse_path(path)
        seg = self.segment(name, occurrence)
        if seg is None:
            return ""
        if comp is None:
            return seg.rep_value(n, rep)
        return seg.component(n, comp, rep, sub)

    # -- MSH shortcuts ---------------------------------------------------------

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    @property
    def control_id(self) -> str:
        """MSH-10 message control ID."""
        return self.segments[0].value(10)

    @property
    def message_type(self) -> tuple[str, str, str]:
        """MSH-9.1 message code, MSH-9.2 trigger event, MSH-9.3 structure ('' where absent)."""
        parts = self.segments[0].components(9)  # one split instead of three reads
        parts += [""] * (3 - len(parts))
        msh = self.segments[0]
        return msh.decode(9, parts[0]), msh.decode(9, parts[1]), msh.decode(9, parts[2])

    @property
    def version(self) -> str:
        """MSH-12.1 version ID."""
        return self.segments[0].component(12, 1)

    def to_er7(self) -> str:
        """The message as ER7 text with CR separators (the lines as received)."""
        return "\r".join(seg.text for seg in self.segments)


_PATH = re.compile(r"([A-Z][A-Z0-9]{2})(?:\[(\d+)\])?-(\d+)(?:\((\d+)\))?(?:\.(\d+)(?:\.(\d+))?)?")


@lru_cache(maxsize=512)
def _parse_path(path: str) -> tuple[str, int, int, int, int | None, int | None]:
    """``OBX[2]-5(1).2.1`` -> (name, occurrence, field, repetition, component, subcomponent)."""
    match = _PATH.fullmatch(path.strip())
    if match is None:
        raise ValueError(f"not an HL7 path: {path!r} (expected e.g. 'PID-3(2).4.1')")
    name, occurrence, n, rep, comp, sub = match.groups()
    return (
        name,
        int(occurrence or 1),
        int(n),
        int(rep or 1),
        int(comp) if comp else None,
        int(sub) if sub else None,
    )


def _checked_line(line: str, index: int, fs: str) -> str:
    """Validate one segment line not covered by the name cache; return it (maybe de-indented)."""
    if not _is_segment_name(line[:3]) and line[:1].isspace():
        line = line.lstrip()  # indented segment: tolerated, hl7apy strips segments too
    name = line[:3]
    if not _is_segment_name(name) or (len(line) > 3 and line[3] != fs):
        raise MessageRejected(
            f"segment {index + 1} does not start with a valid segment name and field separator",
            reason="hl7.bad_segment",
            location=Hl7Location(_safe_name(line), sequence=1),
        )
    if name in _ENVELOPE_NAMES:
        raise MessageRejected(
            f"segment {index + 1} is {name}: several messages or a batch, not one message",
            reason="hl7.batch",
            location=Hl7Location(name),
        )
    _VALID_NAMES.add(name)
    return line


def is_delimiter(char: str) -> bool:
    """Whether ``char`` can be an MSH-1/MSH-2 delimiter: one printable symbol.

    Not a letter, digit or space, and not a control character: 0x0B and 0x1C
    are MLLP framing, which an ACK echoing the delimiters would then carry,
    and a C1 byte such as 0x93 is a latin-1 misreading, not a character.
    """
    return len(char) == 1 and char.isprintable() and not (char.isalnum() or char.isspace())


def read_encoding(msh: str) -> Encoding:
    """Delimiters from MSH-1 (the character after 'MSH') and MSH-2."""
    fs = msh[3:4]
    if not is_delimiter(fs):
        raise MessageRejected(
            "MSH-1 field separator is missing or not a delimiter character",
            reason="hl7.bad_encoding",
            location=Hl7Location("MSH", field=1),
            hl7_error_code=102,
        )
    end = msh.find(fs, 4)
    chars = msh[4:] if end < 0 else msh[4:end]
    return _encoding_from_msh2(fs, chars)


@lru_cache(maxsize=256)
def _encoding_from_msh2(fs: str, chars: str) -> Encoding:
    if not 1 <= len(chars) <= 5 or not all(is_delimiter(c) for c in chars):
        _bad_msh2("MSH-2 encoding characters are missing or garbled")
    truncation = chars[4] if len(chars) == 5 else None
    # Senders that send fewer than four characters mean the standard ones for the rest.
    padded = chars[:4] + _DEFAULT_MSH2[len(chars) :] if len(chars) < 4 else chars[:4]
    used = fs + padded + (truncation or "")
    if len(set(used)) != len(used):
        _bad_msh2("MSH-1/MSH-2 delimiters are not distinct")
    return Encoding(fs, padded[0], padded[1], padded[2], padded[3], truncation)


def _bad_msh2(detail: str) -> NoReturn:
    raise MessageRejected(
        detail,
        reason="hl7.bad_encoding",
        location=Hl7Location("MSH", field=2),
        hl7_error_code=102,
    )


# --------------------------------------------------------------------------- batches


def parse_batch(raw: bytes | bytearray | str) -> list[Message]:
    """Parse an HL7 batch/file: ``[FHS] {[BHS] {MSH ...} [BTS]} [FTS]``, or bare messages.

    Headers and trailers are optional (senders often omit them) but must be
    where the grammar puts them. Raises MessageRejected(reason="hl7.bad_batch")
    for content outside a message, a header inside a message or an open batch,
    or anything after FTS; messages are checked as :meth:`Message.parse` does.
    A single message without batch segments is a batch of one.
    """
    text = raw if isinstance(raw, str) else decode_message(raw)
    lines = _split_lines(_strip_envelope(text))
    groups = _batch_messages(lines)
    return [Message._from_lines(group, read_encoding(group[0])) for group in groups]


def _batch_messages(lines: list[str]) -> list[list[str]]:
    messages: list[list[str]] = []
    current: list[str] | None = None
    batch_open = file_closed = False
    for index, line in enumerate(lines):
        if line.isspace():
            continue
        name = line[:3]
        if file_closed:
            _bad_batch(index, "content after FTS")
        if name == "MSH":
            current = [line]
            messages.append(current)
        elif name == "FHS":
            if index != 0:
                _bad_batch(index, "FHS is not the first segment")
        elif name == "BHS":
            if batch_open or current is not None:
                _bad_batch(index, "BHS inside an open batch or message")
            batch_open = True
        elif name in ("BTS", "FTS"):
            current, batch_open = None, False
            file_closed = name == "FTS"
        elif current is None:
            _bad_batch(index, "segment outside any message (no MSH before it)")
        else:
            current.append(line)
    return messages


def _bad_batch(index: int, why: str) -> NoReturn:
    raise MessageRejected(
        f"batch segment {index + 1}: {why}",
        reason="hl7.bad_batch",
        location=Hl7Location("BHS"),
    )
