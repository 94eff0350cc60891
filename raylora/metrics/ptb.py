"""A pure-Python PTB tokenizer: what pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP 3.4.1
``PTBTokenizer -preserveLines -lowerCase`` plus pycocoevalcap's punctuation removal) makes of a
caption, without Java.

The tokenizer re-implements the behaviour of CoreNLP 3.4.1's JFlex lexer with pycocoevalcap's
options (longest match, earlier rule on ties, trailing context counted in the match length), as
observed on that jar; the tests compare it with the Java tokenizer caption by caption. Captions
are tokenized as the lines of one file, as pycocoevalcap does: a caption's tokens may depend on
the start of the next line (``next_line``). Most chunks between spaces are plain words, looked
up in a cache; only the rest goes through the lexer. One deliberate difference: line separators
other than ``\\n`` inside a caption (``\\r``, U+2028, ...) are taken as spaces, where Java would
start a new output line and shift every later caption (a pycocoevalcap bug).
"""

from __future__ import annotations

import itertools
import operator
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np

__all__ = ["PUNCTUATIONS", "ptb_tokenize", "ptb_tokenize_lines", "clear_caches"]

# pycocoevalcap/tokenizer/ptbtokenizer.py: tokens removed after tokenization. The check runs after
# lower-casing, so "-LRB-" etc. never match (the Java output is "-lrb-"): they stay, as in COCO.
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# ------------------------------------------------------------------------------------------------
# The lexer
# ------------------------------------------------------------------------------------------------


def _ci(words: str) -> str:
    """A literal alternation matched case-insensitively (JFlex %caseless on literals only)."""
    return f"(?i:{words})"


def _words(spec: str) -> str:
    """Alternation of words under JFlex %caseless: literal letters match either case, but character
    classes such as the ``[M]`` of ``[M]iss`` or the ``[ye]`` of ``pp?t[ye]s?`` do not."""
    alts = []
    for w in spec.split("|"):
        parts = re.split(r"(\[[^\]]*\][?*+]?)", w)
        alts.append("".join(p if p.startswith("[") else _ci(p) for p in parts if p))
    return "(?:" + "|".join(alts) + ")"


def _class_from(chars: Iterable[str]) -> str:
    """Regex character-class body matching exactly ``chars`` (as ranges)."""
    out: list[tuple[int, int]] = []
    for cp in sorted(map(ord, chars)):
        if out and cp == out[-1][1] + 1:
            out[-1] = (out[-1][0], cp)
        else:
            out.append((cp, cp))
    return _literal_class("".join(f"\\u{a:04x}" if a == b else f"\\u{a:04x}-\\u{b:04x}" for a, b in out))


def _literal_class(body: str) -> str:
    """A class body with its non-ASCII ``\\uXXXX`` escapes written as the characters themselves,
    which the ``re`` parser reads several times faster."""
    return re.sub(
        r"\\u([0-9a-f]{4})",
        lambda m: m.group(0) if int(m.group(1), 16) < 0x80 else chr(int(m.group(1), 16)),
        body,
    )


_WORD_EXTRA = (
    "\\u00ad\\u0237-\\u024f\\u02c2-\\u02c5\\u02d2-\\u02df\\u02e5-\\u02ff\\u0300-\\u036f\\u0370-\\u037d"
    "\\u0384\\u0385\\u03cf\\u03f6\\u03fc-\\u03ff\\u0483-\\u0487\\u04cf\\u04f6-\\u04ff\\u0510-\\u0525"
    "\\u055a-\\u055f\\u0591-\\u05bd\\u05bf\\u05c1\\u05c2\\u05c4\\u05c5\\u05c7\\u0615-\\u061a"
    "\\u063b-\\u063f\\u064b-\\u065e\\u0670\\u06d6-\\u06ef\\u06fa-\\u06ff\\u070f\\u0711\\u0730-\\u074f"
    "\\u0750-\\u077f\\u07a6-\\u07b1\\u07ca-\\u07f5\\u07fa\\u0900-\\u0903\\u093c\\u093e-\\u094e"
    "\\u0951-\\u0955\\u0962-\\u0963\\u0981-\\u0983\\u09bc-\\u09c4\\u09c7\\u09c8\\u09cb-\\u09cd\\u09d7"
    "\\u09e2\\u09e3\\u0a01-\\u0a03\\u0a3c\\u0a3e-\\u0a4f\\u0a81-\\u0a83\\u0abc-\\u0acf\\u0b82"
    "\\u0bbe-\\u0bc2\\u0bc6-\\u0bc8\\u0bca-\\u0bcd\\u0c01-\\u0c03\\u0c3e-\\u0c56\\u0d3e-\\u0d44"
    "\\u0d46-\\u0d48\\u0e30-\\u0e3a\\u0e47-\\u0e4e\\u0eb1-\\u0ebc\\u0ec8-\\u0ecd"
)

_MISC_SYMBOL = (
    "+%&~\\^|\\\\\\u00a6\\u00a7\\u00a8\\u00a9\\u00ac\\u00ae\\u00af\\u00b0-\\u00b3\\u00b4-\\u00ba\\u00d7"
    "\\u00f7\\u0387\\u05be\\u05c0\\u05c3\\u05c6\\u05f3\\u05f4\\u0600-\\u0603\\u0606-\\u060a\\u060c"
    "\\u0614\\u061b\\u061e\\u066a\\u066d\\u0703-\\u070d\\u07f6\\u07f7\\u07f8\\u0964\\u0965\\u0e4f"
    "\\u1fbd\\u2016\\u2017\\u2020-\\u2023\\u2030-\\u2038\\u203b\\u203e-\\u2042\\u2044\\u207a-\\u207f"
    "\\u208a-\\u208e\\u2100-\\u214f\\u2190-\\u21ff\\u2200-\\u2bff\\u3012\\u30fb\\uff01-\\uff0f"
    "\\uff1a-\\uff20\\uff3b-\\uff40\\uff5b-\\uff65"
)


_WORD_EXTRA = _literal_class(_WORD_EXTRA)
_MISC_SYMBOL = _literal_class(_MISC_SYMBOL)


class _Rule:
    __slots__ = ("name", "alts", "action", "first", "needs")

    def __init__(self, name, alts, action, first, needs=None):
        self.name = name
        self.alts = alts  # list of compiled patterns; group "t" (if any) is the trailing context
        self.action = action
        self.first = first  # compiled pattern: can a match start with this character?
        self.needs = needs  # compiled pattern that must occur in the line for the rule to apply


# Actions take the matched text (without trailing context) and return (token or None, consumed).
def _keep(t):
    return t, len(t)


def _soft(t):
    s = t.replace("\u00ad", "")
    return (s or "-"), len(t)


_SINGLE_QUOTE = re.compile("&apos;|'")
_DOUBLE_QUOTE = re.compile('"|&quot;')
_LEFT_SINGLE = re.compile("[\u0091\u2018\u201b\u2039]")
_RIGHT_SINGLE = re.compile("[\u0092\u2019\u203a]")
_LEFT_DOUBLE = re.compile("[\u0093\u201c\u00ab]")
_RIGHT_DOUBLE = re.compile("[\u0094\u201d\u00bb]")


def _latex_quotes(t: str, left: bool) -> str:
    if left:
        t = _DOUBLE_QUOTE.sub("``", _SINGLE_QUOTE.sub("`", t))
    else:
        t = _DOUBLE_QUOTE.sub("''", _SINGLE_QUOTE.sub("'", t))
    t = _LEFT_SINGLE.sub("`", t)
    t = _RIGHT_SINGLE.sub("'", t)
    t = _LEFT_DOUBLE.sub("``", t)
    return _RIGHT_DOUBLE.sub("''", t)


def _quote_right(t):
    return _latex_quotes(t, False), len(t)


def _quote_left(t):
    return _latex_quotes(t, True), len(t)


def _pushback(n):
    def act(t):
        return t[:-n], len(t) - n

    return act


def _const(s):
    def act(t):
        return s, len(t)

    return act


def _skip(t):
    return None, len(t)


def _nbsp(t):
    return t.replace(" ", "\u00a0"), len(t)


def _amp(t):
    return re.sub("(?i:&amp;)", "&", t), len(t)


def _phone(t):
    return t.replace(" ", "\u00a0").replace("(", "-LRB-").replace(")", "-RRB-"), len(t)


_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}


def _parens(t):
    return t.replace("(", "-LRB-").replace(")", "-RRB-"), len(t)


def _frac2(t):
    return _FRACTIONS.get(t, t), len(t)


def _currency(t):
    return {"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$", "\u20ac": "$"}.get(
        t, t
    ), len(t)


def _hyphens(t):
    return ("--" if 3 <= len(t) <= 4 else t), len(t)


def _sentend_abbrev(t):
    # "etc." before a sentence end: the token keeps its period and the period is lexed again.
    return t, len(t) - 1


def _acronym(t):
    # An acronym before "The", "He", ...: "U.S." + "." again; a single letter "A." gives "A" + ".".
    return (t[:-1], len(t) - 1) if len(t) == 2 else (t, len(t) - 1)


# Abbreviations (JFlex macros ABMONTH ... of CoreNLP 3.4.1, as observed): "|"-separated, caseless
# except inside character classes.
_ABMONTH = "jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec"
_ABDAYS = "mon|tues?|wed|thu(?:rs)?|fri"
_ABSTATE = (
    "ala|ariz|[A]z|[A]rk|calif|colo|conn|ct|dak|[D]el|fla|ga|[I]ll|ind|kans?|ky|[L]a|[M]ass|md|mich|minn|[M]iss"
    "|mo|mont|neb|nev|okla|[O]re|[P]a|penn|tenn|[T]ex|va|vt|[W]ash|wisc?|wyo"
)
_ABCOMP = "inc|cos?|corp|pp?t[ye]s?|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys"
_ABNUM = "tel|est|ext|sq"
_ABPTIT = "jr|sr|bros|ed\\.d|ph\\.d|blvd|rd|esq|bldg"
_ABTITLE = (
    "mrs?|ms|[M]iss|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|mt|capt|ste?"
    "|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|ft|adj|adv|asst|assoc|ens|insp|mlle|mme|msgr|sfc"
)
_ABCOMP2 = "invt|elec|natl|m[ft]g|dept"
_ABOTHER = "vs|alex|wm|jos|cie|a\\.k\\.a|cf|treas|ph"
_ABBREV3 = "ca|figs?|prop|nos?|art|pp|op"
# Any word that might be an abbreviation before a period (case-insensitive: a superset).
_ABBREV_STEM = re.compile(
    "|".join([_ABMONTH, _ABDAYS, _ABSTATE, _ABCOMP, _ABNUM, _ABPTIT, _ABTITLE, _ABCOMP2, _ABOTHER, _ABBREV3])
    + "|etc|al|seq|pt[ey]|co",
    re.IGNORECASE,
)


@lru_cache(maxsize=1)
def _lexer() -> list[_Rule]:
    # [:letter:] is Python's [^\W\d_] without the non-decimal numerics ("²", "½"): a small class.
    bmp = "".join(map(chr, range(0xD800))) + "".join(map(chr, range(0xE000, 0x10000)))
    nums = _class_from(c for c in filter(str.isnumeric, bmp) if not c.isdecimal())
    L = f"[^\\W\\d_{nums}]"
    D = "\\d"
    LD = f"[^\\W_{nums}]"
    splet = "&[aeiouAEIOU]" + _ci("acute|grave|uml") + ";"
    wl = f"(?:{L}|[{_WORD_EXTRA}]|{splet})"
    wld = f"(?:{LD}|[{_WORD_EXTRA}]|{splet})"
    word = f"{wl}{wld}*(?:[.!?]{wl}{wld}*)*"
    space = "[ \\t\\u00a0\\u2000-\\u200a\\u3000]"
    newline = "(?:\\r\\n|[\\r\\n\\u2028\\u2029\\x0b\\x0c\\x85])"
    spacenl = f"(?:{space}|{newline})"
    tag = "[A-Za-z][A-Za-z0-9_:.-]*"
    sgml = (
        f"<(?:[!?][A-Za-z-][^>\\r\\n]*|{tag}(?:[ ]+(?:{tag}[ ]*=[ ]*(?:'[^'\\r\\n]*'|\"[^\"\\r\\n]*\")|{tag}))*[ ]*\\/?"
        f"|\\/{tag})[ ]*>"
    )
    # [:uppercase:] decides only whether "etc." before "The" also yields a "." token (dropped later):
    # ASCII and Latin-1 capitals are enough, and compile much faster than all of Unicode.
    upper = "A-Z\\u00c0-\\u00d6\\u00d8-\\u00de"
    sentend = f"{spacenl}(?:{spacenl}|[{upper}]|{sgml})"
    apos = "(?:['\\u0092\\u2019]|&" + _ci("apos") + ";)"
    aposetc = f"(?:{apos}|[`\\u0091\\u2018\\u201b])"
    hyphen = "[-_\\u058a\\u2010\\u2011]"
    num = f"(?:{D}*(?:[.:,\\u00ad\\u066b\\u066c]{D}+)+|{D}+)"
    acro = (
        "(?:[A-Za-z](?:\\.[A-Za-z])+|"
        + _ci("(?:canada|sino|korean|eu|japan|non)-u\\.s|u\\.s\\.-(?:u\\.k|u\\.s\\.s\\.r)")
        + ")"
    )
    acro1 = (
        "(?:[A-Za-z](?:\\.[A-Za-z])*|"
        + _ci("(?:canada|sino|korean|eu|japan|non)-u\\.s|u\\.s\\.-(?:u\\.k|u\\.s\\.s\\.r)")
        + ")"
    )
    abmonth, abdays, abstate = _words(_ABMONTH), _words(_ABDAYS), _words(_ABSTATE)
    abcomp, abnum, abptit = _words(_ABCOMP), _words(_ABNUM), _words(_ABPTIT)
    abbrev1 = f"(?:{abmonth}|{abdays}|{abstate}|{abcomp}|{abnum}|{abptit}|{_ci('etc|al|seq')})\\."
    abtitle, abcomp2, abother = _words(_ABTITLE), _words(_ABCOMP2), _words(_ABOTHER)
    abbrev4 = f"(?:{abtitle}|{abother}|{acro1}|{abcomp2})"
    abbrev3 = _words(_ABBREV3)
    lowercase_words = "|".join(
        w[0] + _ci(w[1:]) if len(w) > 1 else w
        for w in (
            "About According Additionally After An A As At But Earlier He Her Here However If In It Last Many More "
            "Now Once One Other Our She Since So Some Such That The Their Then There These They This We When While "
            "What Yet You"
        ).split()
    )
    lowercase_words += "|M" + _ci("r") + "\\.|M" + _ci("s") + "\\.|" + sgml
    fileext = _words(
        "bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|png|ppt"
        "|ps|py|sql|tar|txt|wav|x|xml|zip"
    )
    thing_pre = f"(?:[dDoOlL]{aposetc}{LD})"
    thing = f"{thing_pre}?{LD}+(?:{hyphen}{thing_pre}?{LD}+)*"
    thinga = "[A-Z]+(?:(?:&" + _ci("amp") + ";|[+&])[A-Z]+)+"
    thing3 = "[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\\\?\\/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
    hthing = f"[A-Za-z0-9][A-Za-z0-9.,\\u00ad]*(?:-(?:{acro}\\.|[A-Za-z0-9\\u00ad]+))+"
    redaux = f"{apos}(?:[msdMSD]|{_ci('re|ve|ll')})"
    sword = "[A-Za-z\\u00ad]*[A-MO-Za-mo-z]\\u00ad*"
    sredaux = f"{_ci('n')}{aposetc}{_ci('t')}"
    apoword = [
        f"{apos}{_ci('n')}{apos}?",
        f"[lLdDjJ]{apos}",
        f"{_ci('dunkin|somethin|ol')}{apos}",
        f"{apos}{_ci('em')}",
        f"[A-HJ-XZn]{aposetc}{L}{{2,}}",
        f"{apos}[2-9]0{_ci('s')}",
        f"{apos}{_ci('till?|cause')}",
        f"{L}+[aeiouyAEIOUY]{aposetc}[aeiouA-Z]{L}*",
        _ci("cont'd\\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l"),
    ]
    fullurl = _ci("https?") + ':\\/\\/[^ \\t\\n\\f\\r"<>|(){}]+[^ \\t\\n\\f\\r"<>|.!?(){},-]'
    urltail = '(?:\\/[^ \\t\\n\\f\\r"<>|()]+[^ \\t\\n\\f\\r"<>|.!?(){},-])?'
    likelyurl = [
        _ci("www") + '\\.(?:[^ \\t\\n\\f\\r"<>|.!?(){},]+\\.)+[a-zA-Z]{2,4}' + urltail,
        "(?:[^ \\t\\n\\f\\r\"`'<>|.!?(){},-_$]+\\.)+" + _ci("com|net|org|edu") + urltail,
    ]
    email = (
        "(?:&" + _ci("lt") + ';|<)?[a-zA-Z0-9][^ \\t\\n\\f\\r"<>|()\\u00a0{}]*@'
        '(?:[^ \\t\\n\\f\\r"<>|(){}.\\u00a0]+\\.)*[^ \\t\\n\\f\\r"<>|(){}.\\u00a0]+(?:&' + _ci("gt") + ";|>)?"
    )
    insentp = "[,;:\\u3001]"
    dblquot = '(?:"|&' + _ci("quot") + ";)"
    quotes = [
        apos,
        "''",
        "[`\\u2018\\u2019\\u201a\\u201b\\u201c\\u201d\\u0091\\u0092\\u0093\\u0094\\u201e\\u201f\\u2039\\u203a\\u00ab\\u00bb]{1,2}",
    ]
    phone = (
        "(?:\\([0-9]{2,3}\\)[ \\u00a0]?|(?:\\+\\+?)?(?:[0-9]{2,4}[- \\u00a0])?[0-9]{2,4}[- \\u00a0])[0-9]{3,4}[- \\u00a0]?[0-9]{3,5}"
        "|(?:(?:\\+\\+?)?[0-9]{2,4}\\.)?[0-9]{2,4}\\.[0-9]{3,4}\\.[0-9]{3,5}"
    )

    smiley = "[<>]?[:;=][-o*']?[()DPdpO\\\\{@|\\[\\]]"
    asiansmiley = [
        "[\\^x=~<>]\\.\\[" + _ci("\\^x=~<>\\]"),
        "[-\\^x=~<>']_[-\\^x=~<>']",
        "\\([-\\^x=~<>'][_.]?[-\\^x=~<>']\\)",
        "\\([\\^x=~<>']-[\\^x=~<>'`]\\)",
    ]
    A = f"{L}|[{_WORD_EXTRA}&]"  # first characters of word-like rules
    AD = f"{LD}|[{_WORD_EXTRA}&]"
    rules_spec = [
        # name, alternatives, trailing context, action, first chars, needs
        ("proglang", [_ci("c\\+\\+|[cf]#")], None, _keep, "[cCfF]", None),
        ("assim3", [_ci("cannot|'twas")], None, _pushback(3), "[cC']", None),
        (
            "assim2",
            [_ci("gonna|gotta|lemme|gimme|wanna"), "'" + _ci("tis")],
            None,
            _pushback(2),
            "[gGlLwW'&\\u0092\\u2019]",
            None,
        ),
        ("sgml", [sgml], None, _nbsp, "<", "<"),
        (
            "spmdash",
            ["&" + _ci("md|mdash|ndash") + ";|[\\u0096\\u0097\\u2013\\u2014\\u2015]"],
            None,
            _const("--"),
            "[&\\u0096\\u0097\\u2013\\u2014\\u2015]",
            None,
        ),
        ("spamp", ["&" + _ci("amp") + ";"], None, _const("&"), "&", None),
        ("sppunc", ["&" + _ci("ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+") + ";"], None, _keep, "&", None),
        ("word_redaux", [word], redaux, _soft, A, None),
        ("sword_sredaux", [sword], sredaux, _soft, "[A-Za-z\\u00ad]", None),
        ("word", [word], None, _soft, A, None),
        ("apoword", apoword, None, _keep, f"{L}|['\\u0092\\u2019&]", None),
        ("apoword2", [_ci("y") + apos], L, _keep, "[yY]", None),
        ("fullurl", [fullurl], None, _keep, "[hH]", "://"),
        ("likelyurl", likelyurl, None, _keep, ".", "(?i:www\\.|\\.com|\\.net|\\.org|\\.edu)"),
        ("email", [email], None, _keep, "[a-zA-Z0-9<&]", "@"),
        ("twitter", [f"@[a-zA-Z_][a-zA-Z_0-9]*|#{wl}+"], None, _keep, "[@#]", None),
        ("redaux_ctx", [redaux], "[^A-Za-z]", _quote_right, "['\\u0092\\u2019&]", None),
        ("sredaux", [sredaux], None, _quote_right, "[nN]", None),
        ("date", [f"{D}{{1,2}}[-/]{D}{{1,2}}[-/]{D}{{2,4}}"], None, _keep, D, None),
        ("number", [f"[-+]?{num}"], None, _soft, "[-+\\d.:,\\u00ad\\u066b\\u066c]", None),
        (
            "subsupnum",
            [
                "[\\u207a\\u207b\\u208a\\u208b]?(?:[\\u2070\\u00b9\\u00b2\\u00b3\\u2074-\\u2079]+|[\\u2080-\\u2089]+)"
            ],
            None,
            _keep,
            "[\\u207a\\u207b\\u208a\\u208b\\u2070\\u00b9\\u00b2\\u00b3\\u2074-\\u2079\\u2080-\\u2089]",
            None,
        ),
        (
            "frac",
            [f"(?:{D}{{1,4}}[- \\u00a0])?{D}{{1,4}}(?:\\\\?\\/|\\u2044){D}{{1,4}}"],
            None,
            _nbsp,
            D,
            None,
        ),
        (
            "frac2",
            ["[\\u00bc\\u00bd\\u00be\\u2153-\\u215e]"],
            None,
            _frac2,
            "[\\u00bc\\u00bd\\u00be\\u2153-\\u215e]",
            None,
        ),
        (
            "tbspec",
            [
                "-(?:"
                + _ci("rrb|lrb|rcb|lcb|rsb|lsb")
                + ")-|"
                + _ci("c\\.d\\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls")
                + "|"
                + _ci("cap")
                + apos
                + _ci("n")
                + "|"
                + _ci("c")
                + apos
                + _ci("est")
            ],
            None,
            _amp,
            "[-cCpPaAsS]",
            None,
        ),
        ("thing3", [thing3], None, _keep, "[A-Za-z0-9]", "/"),
        ("dolsign", ["[A-Z]*\\$|#"], None, _keep, "[A-Z$#]", None),
        (
            "dolsign2",
            [
                "[\\u00a2\\u00a3\\u00a4\\u00a5\\u0080\\u20a0\\u20ac\\u060b\\u0e3f\\u20a4\\uffe0\\uffe1\\uffe5\\uffe6]"
            ],
            None,
            _currency,
            "[\\u00a2\\u00a3\\u00a4\\u00a5\\u0080\\u20a0\\u20ac\\u060b\\u0e3f\\u20a4\\uffe0\\uffe1\\uffe5\\uffe6]",
            None,
        ),
        (
            "acronym",
            [f"{acro1}\\."],
            f"{spacenl}+(?:{lowercase_words})(?:{spacenl}|\\Z)",
            _acronym,
            "[A-Za-z]",
            None,
        ),
        ("abbrev3", [f"{abbrev3}\\."], f"{spacenl}?{D}", _keep, "[A-Za-z]", None),
        ("pty_ltd", [_ci("pt[ey]|co") + "\\."], f"{space}{_ci('ltd|lim')}", _keep, "[pPcC]", None),
        ("abbrev1_end", [abbrev1], sentend, _sentend_abbrev, "[A-Za-z]", None),
        ("abbrev1_mid", [abbrev1], "(?s:..)", _keep, "[A-Za-z]", None),
        ("abbrev1", [abbrev1], None, _sentend_abbrev, "[A-Za-z]", None),
        ("abbrev2", [f"{abbrev4}\\."], None, _keep, "[A-Za-z]", None),
        ("abbrev4", [abbrev4], space, _keep, "[A-Za-z]", None),
        ("acro", [acro], spacenl, _keep, "[A-Za-z]", None),
        ("tbspec2", [f"{apos}[0-9][0-9]"], spacenl, _keep, "['\\u0092\\u2019&]", None),
        ("filename", [f"{LD}+(?:\\.{LD}+)*\\.{fileext}"], f"(?:{spacenl}|[.?!,])", _keep, f"{LD}", None),
        ("word_dot", [f"{word}\\."], insentp, _soft, A, None),
        ("phone", [phone], None, _phone, "[(+0-9]", None),
        ("dblquot_left", [dblquot], "[A-Za-z0-9$]", _quote_left, '["&]', None),
        ("dblquot", [dblquot], None, _quote_right, '["&]', None),
        ("del", ["\\x7f"], None, _skip, "\\x7f", None),
        ("lt", ["<|&" + _ci("lt") + ";"], None, _const("<"), "[<&]", None),
        ("gt", [">|&" + _ci("gt") + ";"], None, _const(">"), "[>&]", None),
        ("smiley", [smiley], "[^A-Za-z0-9]", _parens, "[<>:;=]", None),
        ("asiansmiley", asiansmiley, None, _parens, "[-^x=~<>'(]", None),
        ("lcb", ["\\{"], None, _const("-LCB-"), "\\{", None),
        ("rcb", ["\\}"], None, _const("-RCB-"), "\\}", None),
        ("lsb", ["\\["], None, _const("-LSB-"), "\\[", None),
        ("rsb", ["\\]"], None, _const("-RSB-"), "\\]", None),
        ("lrb", ["\\("], None, _const("-LRB-"), "\\(", None),
        ("rrb", ["\\)"], None, _const("-RRB-"), "\\)", None),
        ("hyphens", ["-+"], None, _hyphens, "-", None),
        (
            "ldots",
            ["\\.{3,5}|(?:\\.[ \\u00a0]){2,4}\\.|[\\u0085\\u2026]"],
            None,
            _const("..."),
            "[.\\u0085\\u2026]",
            None,
        ),
        ("fnmarks", ["@+|#+|_+"], None, _keep, "[@#_]", None),
        ("asts", ["\\*+|(?:\\\\\\*){1,3}"], None, _keep, "[*\\\\]", None),
        ("insentp", [insentp], None, _keep, "[,;:\\u3001]", None),
        ("qmarks", ["[?!]+"], None, _keep, "[?!]", None),
        (
            "period",
            ["[.\\u00a1\\u00bf\\u037e\\u0589\\u061f\\u06d4\\u0700-\\u0702\\u07fa\\u3002]"],
            None,
            _keep,
            "[.\\u00a1\\u00bf\\u037e\\u0589\\u061f\\u06d4\\u0700-\\u0702\\u07fa\\u3002]",
            None,
        ),
        ("equals", ["="], None, _keep, "=", None),
        ("slash", ["\\/"], None, _keep, "/", None),
        ("hthing_dot", [f"{hthing}\\."], insentp, _soft, "[A-Za-z0-9]", "-"),
        ("hthing", [hthing], None, _soft, "[A-Za-z0-9]", "-"),
        ("thing_dot", [f"{thing}\\."], insentp, _keep, AD, None),
        ("thing", [thing], None, _keep, AD, None),
        ("thinga_dot", [f"{thinga}\\."], insentp, _amp, "[A-Z]", None),
        ("thinga", [thinga], None, _amp, "[A-Z]", None),
        ("quote_left", ["'"], "[A-Za-z][^ \\t\\n\\r\\u00a0]", _quote_left, "'", None),
        ("redaux", [redaux], None, _quote_right, "['\\u0092\\u2019&]", None),
        (
            "quotes",
            quotes,
            None,
            _quote_right,
            "['\\u0092\\u2019&`\\u2018-\\u201f\\u0091-\\u0094\\u2039\\u203a\\u00ab\\u00bb]",
            None,
        ),
        ("duckfeet", ["<<|>>"], None, _keep, "[<>]", None),
        ("miscsymbol", [f"[{_MISC_SYMBOL}]"], None, _keep, f"[{_MISC_SYMBOL}]", None),
        (
            "space",
            [f"\\x00|{space}+|[\\u200b\\u200e\\u200f\\ufeff]"],
            None,
            _skip,
            f"[\\x00\\u200b\\u200e\\u200f\\ufeff]|{space}",
            None,
        ),
        ("newline", [newline], None, _const("\n"), "[\\r\\n\\u2028\\u2029\\x0b\\x0c\\x85]", None),
        ("nbsp", ["&" + _ci("nbsp") + ";"], None, _skip, "&", None),
    ]
    rules = []
    for name, alts, trail, action, first, needs in rules_spec:
        pats = []
        for a in alts:
            pats.append(re.compile(f"(?:{a})(?=(?P<t>{trail}))" if trail else f"(?:{a})"))
        rules.append(_Rule(name, pats, action, re.compile(first), re.compile(needs) if needs else None))
    return rules


_dispatch: dict[str, tuple[_Rule, ...]] = {}  # first character -> rules whose match can start with it


def _lex(text: str, stop: int, shortcut: bool = True) -> list[str]:
    """PTB tokens of ``text[:stop]`` (``text`` may go on past ``stop`` as trailing context).

    With ``shortcut``, a simple chunk between two spaces is not lexed but taken, already lower-cased
    and without punctuation, from the chunk cache (see ``_tokenize_chunk``).
    """
    rules = _lexer()
    needs_ok: dict[_Rule, bool] = {}
    out: list[str] = []
    pos = 0
    while pos < stop:
        if shortcut and (pos == 0 or text[pos - 1] == " "):
            end = text.find(" ", pos, stop)
            # a simple chunk followed by a space; "fig." before " 5" keeps its period (ABBREV3)
            if end > pos and not (text[end - 1] == "." and _DIGIT.match(text, end + 1)):
                got = _tokenize_chunk(text[pos:end], False)
                if got is not None:
                    if got:
                        out.append(got)
                    pos = end
                    continue
        c = text[pos]
        cands = _dispatch.get(c)
        if cands is None:
            cands = _dispatch[c] = tuple(r for r in rules if r.first.match(c))
        best_len, best_rule, best_text = 0, None, ""
        for rule in cands:
            if rule.needs is not None:
                ok = needs_ok.get(rule)
                if ok is None:
                    ok = needs_ok[rule] = rule.needs.search(text) is not None
                if not ok:
                    continue
            for pat in rule.alts:
                m = pat.match(text, pos)
                if m is None:
                    continue
                t = m.group(0)
                total = len(t) + (len(m.group("t")) if "t" in pat.groupindex else 0)
                if total > best_len:
                    best_len, best_rule, best_text = total, rule, t
        if best_rule is None:  # untokenizable character: deleted
            pos += 1
            continue
        tok, consumed = best_rule.action(best_text)
        if consumed <= 0:  # never loop (cannot happen with the rules above)
            consumed = len(best_text) or 1
        pos += consumed
        if tok is not None:
            out.append(tok)
    return out


def _clean(text: str) -> str:
    # pycocoevalcap replaces "\n" by " "; other line separators would make Java start a new output
    # line (shifting every later caption), so they are taken as spaces. Java lexes UTF-16: a
    # character outside the BMP is two (untokenizable) surrogates, and so it is here.
    text = text.replace("\n", " ")
    if _ODD.search(text):
        text = _ODD.sub(_odd_char, text)
    return text


def _odd_char(m: re.Match) -> str:
    c = m.group(0)
    if c in _LINE_SEPS:
        return " "
    cp = ord(c) - 0x10000
    return chr(0xD800 + (cp >> 10)) + chr(0xDC00 + (cp & 0x3FF))


_LINE_SEPS = frozenset("\r\u2028\u2029\x0b\x0c")
_ODD = re.compile("[\r\u2028\u2029\x0b\x0c\U00010000-\U0010ffff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _unsurrogate(t: str) -> str:
    return (
        t.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace") if _SURROGATE.search(t) else t
    )


def _finish(tokens: Iterable[str]) -> str:
    # Java writes the lower-cased tokens space-separated; pycocoevalcap rstrips the line, splits it
    # on " " and drops the punctuation tokens.
    line = " ".join(_unsurrogate(t).lower() for t in tokens if t != "\n").rstrip()
    return " ".join(w for w in line.split(" ") if w not in PUNCTUATIONS)


# Fast path: a caption made only of "simple" chunks is tokenized chunk by chunk, each chunk cached.
# A simple chunk's tokens cannot depend on its neighbours: no digits (fractions, phone numbers),
# no quotes, no inner periods (acronyms), no single letter before a period ("A. The" -> "A" ".").
# Whatever follows a chunk (a space, or a newline and the next caption) acts the same, except the
# end of the file: "you're" is "you 're" before a space but "you ` re" at the very end.
_SIMPLE_CHUNK = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*'?(?:[,;:!?]|(?<=[A-Za-z][A-Za-z])\.)?\Z")
_DIGIT = re.compile(r"\d")
_PLAIN_CHUNK = re.compile(r"([A-Za-z]+)([,;:!?.]?)\Z")
_ASSIMILATED = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])  # "cannot" -> "can not"
_chunk_cache: dict[str, str | None] = {"": ""}
_last_chunk_cache: dict[str, str | None] = {}
_MISSING = object()
_UNSAFE = "\x02"  # cached for a chunk that is not simple
_CACHE_LIMIT = 500_000


def _tokenize_chunk(chunk: str, at_eof: bool) -> str | None:
    """Tokens of a chunk (cached), or None if the chunk is not simple."""
    cache = _last_chunk_cache if at_eof else _chunk_cache
    got = cache.get(chunk, _MISSING)
    if got is not _MISSING:
        return None if got == _UNSAFE else got
    m = _PLAIN_CHUNK.match(chunk)
    if m and m.group(1).lower() not in _ASSIMILATED:
        # a plain word, maybe with one punctuation mark: the word, unless "<abbreviation>."
        core, mark = m.groups()
        if mark != "." or (len(core) > 1 and not _ABBREV_STEM.fullmatch(core)):
            got = core.lower()
    if got is _MISSING:
        if not _SIMPLE_CHUNK.match(chunk):
            got = None
        elif at_eof:
            got = _finish(_lex(chunk, len(chunk), False))
        else:
            got = _finish(_lex(chunk + " ", len(chunk), False))
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
        cache[""] = ""
    cache[chunk] = _UNSAFE if got is None else got
    return got


def clear_caches() -> None:
    """Forget the tokenizer's chunk caches and compiled lexer (to time a cold start)."""
    _chunk_cache.clear()
    _chunk_cache[""] = ""
    _last_chunk_cache.clear()
    _dispatch.clear()
    _lexer.cache_clear()


def ptb_tokenize(text: str, next_line: str | None = None) -> str:
    """Tokenize one caption exactly as pycocoevalcap's PTBTokenizer does.

    ``next_line`` is the caption that follows in the tokenizer's input file (None: end of file);
    it matters only in rare cases (a caption ending in "Route A." before one starting "A ...").
    """
    text = _clean(text)
    chunks = text.split(" ")
    # "fig." before a newline and a digit keeps its period: leave that to the full lexer.
    if not (next_line and text.rstrip(" ")[-1:] == "." and _DIGIT.match(next_line)):
        last = len(chunks) - 1
        while last >= 0 and not chunks[last]:
            last -= 1
        parts = []
        for i, chunk in enumerate(chunks):
            if not chunk:
                continue
            got = _tokenize_chunk(chunk, i == last and next_line is None)
            if got is None:
                break
            if got:
                parts.append(got)
        else:
            return " ".join(parts)
    if next_line is None:
        return _finish(_lex(text, len(text)))
    return _finish(_lex(text + "\n" + _clean(next_line), len(text)))


# any whitespace but " " (str.split() would split there), or a character outside the BMP
_NOT_PLAIN = re.compile(
    "[" + "".join(c for c in map(chr, range(0x10000)) if c.isspace() and c != " ") + "\U00010000-\U0010ffff]"
)
_DIGIT_LINE = re.compile("\x01 \\d")


def ptb_tokenize_lines(lines: Sequence[str]) -> list[str]:
    """Tokenize captions as one PTBTokenizer input file (each line sees the start of the next).

    Equal to ``[ptb_tokenize(line, next_line) ...]``, but the simple chunks of all lines are looked
    up in the chunk cache in one pass; only lines with a chunk that is not simple are lexed.
    """
    n = len(lines)
    if n == 0:
        return []
    big = " \x01 ".join(lines)
    if big.count("\x01") != n - 1 or _UNSAFE in big:  # (never in real captions)
        return [ptb_tokenize(line, lines[i + 1] if i + 1 < n else None) for i, line in enumerate(lines)]
    chunks = big.split()
    cache = _chunk_cache
    new = set(chunks).difference(cache)
    new.discard("\x01")
    if len(new) >= _CACHE_LIMIT:
        return [ptb_tokenize(line, lines[i + 1] if i + 1 < n else None) for i, line in enumerate(lines)]
    if len(cache) + len(new) >= _CACHE_LIMIT:
        cache.clear()
        cache[""] = ""
    for chunk in new:
        _tokenize_chunk(chunk, False)
    # the line separator "\x01" is the only chunk not in the cache
    out = " ".join(map(cache.get, chunks, itertools.repeat("\x01"))).split("\x01")
    out = list(map(str.strip, out))
    # lines to lex: with a chunk that is not simple, with other whitespace (the split above was not
    # the lexer's), "fig." before a line starting with a digit, and the last line (end of file)
    redo = set(itertools.compress(range(n), map(operator.contains, out, itertools.repeat(_UNSAFE))))
    line_end = np.cumsum(np.fromiter(map(len, lines), dtype=np.int64, count=n) + 3)  # offsets in big
    odd = [m.start() for m in _NOT_PLAIN.finditer(big)]
    redo.update(np.searchsorted(line_end, odd, side="right").tolist())
    for m in _DIGIT_LINE.finditer(big):  # "\x01 5...": the line before starts the next with a digit
        i = int(np.searchsorted(line_end, m.start(), side="right"))
        if lines[i].rstrip().endswith("."):
            redo.add(i)
    redo.add(n - 1)
    for i in redo:
        out[i] = ptb_tokenize(lines[i], lines[i + 1] if i + 1 < n else None)
    return out
