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

The lexer is written as data, like the JFlex spec it follows: macros (``_MACROS``, referred to as
``{NAME}``) and the rules in priority order (``_RULES``: pattern, trailing context, action), compiled
on first use.
"""

from __future__ import annotations

import itertools
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np

__all__ = ["PUNCTUATIONS", "ptb_tokenize", "ptb_tokenize_lines", "clear_caches"]

# pycocoevalcap/tokenizer/ptbtokenizer.py: tokens removed after tokenization. The check runs after
# lower-casing, so "-LRB-" etc. never match (the Java output is "-lrb-"): they stay, as in COCO.
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# ------------------------------------------------------------------------------------------------
# Actions: the matched text (trailing context excluded) -> (token or None, characters consumed)
# ------------------------------------------------------------------------------------------------

_Action = Callable[[str], tuple[str | None, int]]


def _keep(t: str) -> tuple[str, int]:
    return t, len(t)


def _soft(t: str) -> tuple[str, int]:
    """Soft hyphens removed (a token made of soft hyphens only becomes "-")."""
    s = t.replace("\u00ad", "")
    return (s or "-"), len(t)


def _skip(t: str) -> tuple[None, int]:
    return None, len(t)


def _const(s: str) -> _Action:
    def act(t: str) -> tuple[str, int]:
        return s, len(t)

    return act


def _pushback(n: int) -> _Action:
    """The match without its last ``n`` characters, which are lexed again ("cannot" -> "can" "not")."""

    def act(t: str) -> tuple[str, int]:
        return t[:-n], len(t) - n

    return act


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


def _quote_right(t: str) -> tuple[str, int]:
    return _latex_quotes(t, False), len(t)


def _quote_left(t: str) -> tuple[str, int]:
    return _latex_quotes(t, True), len(t)


def _nbsp(t: str) -> tuple[str, int]:
    return t.replace(" ", "\u00a0"), len(t)


def _amp(t: str) -> tuple[str, int]:
    return re.sub("(?i:&amp;)", "&", t), len(t)


def _parens(t: str) -> tuple[str, int]:
    return t.replace("(", "-LRB-").replace(")", "-RRB-"), len(t)


def _phone(t: str) -> tuple[str, int]:
    return t.replace(" ", "\u00a0").replace("(", "-LRB-").replace(")", "-RRB-"), len(t)


_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_CURRENCIES = {"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$", "\u20ac": "$"}


def _fraction(t: str) -> tuple[str, int]:
    return _FRACTIONS.get(t, t), len(t)


def _currency(t: str) -> tuple[str, int]:
    return _CURRENCIES.get(t, t), len(t)


def _hyphens(t: str) -> tuple[str, int]:
    return ("--" if 3 <= len(t) <= 4 else t), len(t)


def _sentend_abbrev(t: str) -> tuple[str, int]:
    # "etc." before a sentence end: the token keeps its period and the period is lexed again.
    return t, len(t) - 1


def _acronym(t: str) -> tuple[str, int]:
    # An acronym before "The", "He", ...: "U.S." + "." again; a single letter "A." gives "A" + ".".
    return (t[:-1], len(t) - 1) if len(t) == 2 else (t, len(t) - 1)


# ------------------------------------------------------------------------------------------------
# Macros (the JFlex spec's): a pattern refers to the macro NAME as {NAME}
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
    return "|".join(alts)


def _capitalised(words: str) -> str:
    """Alternation of words whose first letter is matched as written and the rest in any case."""
    return "|".join(w[0] + _ci(w[1:]) if len(w) > 1 else w for w in words.split())


# Abbreviations (JFlex macros ABMONTH ... of CoreNLP 3.4.1, as observed): "|"-separated, caseless
# except inside character classes.
_ABBREVIATIONS = {
    "ABMONTH": "jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec",
    "ABDAYS": "mon|tues?|wed|thu(?:rs)?|fri",
    "ABSTATE": "ala|ariz|[A]z|[A]rk|calif|colo|conn|ct|dak|[D]el|fla|ga|[I]ll|ind|kans?|ky|[L]a|[M]ass|md"
    "|mich|minn|[M]iss|mo|mont|neb|nev|okla|[O]re|[P]a|penn|tenn|[T]ex|va|vt|[W]ash|wisc?|wyo",
    "ABCOMP": "inc|cos?|corp|pp?t[ye]s?|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys",
    "ABNUM": "tel|est|ext|sq",
    "ABPTIT": r"jr|sr|bros|ed\.d|ph\.d|blvd|rd|esq|bldg",
    "ABTITLE": "mrs?|ms|[M]iss|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl"
    "|pvt|mt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|ft|adj|adv|asst|assoc|ens|insp"
    "|mlle|mme|msgr|sfc",
    "ABCOMP2": "invt|elec|natl|m[ft]g|dept",
    "ABOTHER": r"vs|alex|wm|jos|cie|a\.k\.a|cf|treas|ph",
    "ABBREV3": "ca|figs?|prop|nos?|art|pp|op",
}
# Any word that might be an abbreviation before a period (case-insensitive: a superset).
_ABBREV_STEM = re.compile("|".join(_ABBREVIATIONS.values()) + "|etc|al|seq|pt[ey]|co", re.IGNORECASE)

# Character-class bodies, written inside [...] as {NAME}. NUMERIC (the numeric characters that are
# not decimal digits: "²", "½", ...) is computed from Python's Unicode tables when the lexer is built.
_CLASSES = {
    "WORD_EXTRA": (  # letter-like characters outside [:letter:]: marks, soft hyphen, modifiers
        r"\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f\u0370-\u037d\u0384"
        r"\u0385\u03cf\u03f6\u03fc-\u03ff\u0483-\u0487\u04cf\u04f6-\u04ff\u0510-\u0525\u055a-\u055f"
        r"\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7\u0615-\u061a\u063b-\u063f\u064b-\u065e"
        r"\u0670\u06d6-\u06ef\u06fa-\u06ff\u070f\u0711\u0730-\u074f\u0750-\u077f\u07a6-\u07b1"
        r"\u07ca-\u07f5\u07fa\u0900-\u0903\u093c\u093e-\u094e\u0951-\u0955\u0962-\u0963\u0981-\u0983"
        r"\u09bc-\u09c4\u09c7\u09c8\u09cb-\u09cd\u09d7\u09e2\u09e3\u0a01-\u0a03\u0a3c\u0a3e-\u0a4f"
        r"\u0a81-\u0a83\u0abc-\u0acf\u0b82\u0bbe-\u0bc2\u0bc6-\u0bc8\u0bca-\u0bcd\u0c01-\u0c03"
        r"\u0c3e-\u0c56\u0d3e-\u0d44\u0d46-\u0d48\u0e30-\u0e3a\u0e47-\u0e4e\u0eb1-\u0ebc\u0ec8-\u0ecd"
    ),
    "MISC_SYMBOL": (
        r"+%&~\^|\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00b3\u00b4-\u00ba\u00d7\u00f7"
        r"\u0387\u05be\u05c0\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e"
        r"\u066a\u066d\u0703-\u070d\u07f6\u07f7\u07f8\u0964\u0965\u0e4f\u1fbd\u2016\u2017\u2020-\u2023"
        r"\u2030-\u2038\u203b\u203e-\u2042\u2044\u207a-\u207f\u208a-\u208e\u2100-\u214f\u2190-\u21ff"
        r"\u2200-\u2bff\u3012\u30fb\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"
    ),
}

_MACROS = {
    # letters ([:letter:] is Python's [^\W\d_] without the non-decimal numerics), digits, words
    "L": r"[^\W\d_{NUMERIC}]",
    "D": r"\d",
    "LD": r"[^\W_{NUMERIC}]",
    "SPLET": r"&[aeiouAEIOU](?i:acute|grave|uml);",
    "WL": r"{L}|[{WORD_EXTRA}]|{SPLET}",
    "WLD": r"{LD}|[{WORD_EXTRA}]|{SPLET}",
    "WORD": r"{WL}{WLD}*(?:[.!?]{WL}{WLD}*)*",
    "SWORD": r"[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*",
    # white space, SGML tags, sentence ends
    "SPACE": r"[ \t\u00a0\u2000-\u200a\u3000]",
    "NEWLINE": r"\r\n|[\r\n\u2028\u2029\x0b\x0c\x85]",
    "SPACENL": r"{SPACE}|{NEWLINE}",
    "TAG": r"[A-Za-z][A-Za-z0-9_:.-]*",
    "SGML": r"""<(?:[!?][A-Za-z-][^>\r\n]*|{TAG}(?:[ ]+(?:{TAG}[ ]*=[ ]*(?:'[^'\r\n]*'|"[^"\r\n]*")|{TAG}))*"""
    r"""[ ]*\/?|\/{TAG})[ ]*>""",
    # [:uppercase:] decides only whether "etc." before "The" also yields a "." token (dropped later):
    # ASCII and Latin-1 capitals are enough, and compile much faster than all of Unicode.
    "SENTEND": r"{SPACENL}(?:{SPACENL}|[A-Z\u00c0-\u00d6\u00d8-\u00de]|{SGML})",
    # apostrophes, contractions, quotes
    "APOS": r"['\u0092\u2019]|&(?i:apos);",
    "APOSETC": r"{APOS}|[`\u0091\u2018\u201b]",
    "REDAUX": r"{APOS}(?:[msdMSD]|(?i:re|ve|ll))",
    "SREDAUX": r"(?i:n){APOSETC}(?i:t)",
    "DBLQUOT": r'"|&(?i:quot);',
    # numbers, acronyms, abbreviations
    "NUM": r"{D}*(?:[.:,\u00ad\u066b\u066c]{D}+)+|{D}+",
    "ACRO_US": r"(?i:(?:canada|sino|korean|eu|japan|non)-u\.s|u\.s\.-(?:u\.k|u\.s\.s\.r))",
    "ACRO": r"[A-Za-z](?:\.[A-Za-z])+|{ACRO_US}",
    "ACRO1": r"[A-Za-z](?:\.[A-Za-z])*|{ACRO_US}",
    **{name: _words(spec) for name, spec in _ABBREVIATIONS.items()},
    "ABBREV1": r"(?:{ABMONTH}|{ABDAYS}|{ABSTATE}|{ABCOMP}|{ABNUM}|{ABPTIT}|(?i:etc|al|seq))\.",
    "ABBREV4": r"{ABTITLE}|{ABOTHER}|{ACRO1}|{ABCOMP2}",
    # words after which a period ending an acronym is a sentence end
    "LOWERCASE_WORDS": _capitalised(
        "About According Additionally After An A As At But Earlier He Her Here However If In It Last Many More "
        "Now Once One Other Our She Since So Some Such That The Their Then There These They This We When While "
        "What Yet You"
    )
    + r"|M(?i:r)\.|M(?i:s)\.|{SGML}",
    "FILEEXT": _words(
        "bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|png|ppt"
        "|ps|py|sql|tar|txt|wav|x|xml|zip"
    ),
    # things: hyphenated words, compounds with "&" or "/", ...
    "HYPHEN": r"[-_\u058a\u2010\u2011]",
    "THING_PRE": r"[dDoOlL]{APOSETC}{LD}",
    "THING": r"{THING_PRE}?{LD}+(?:{HYPHEN}{THING_PRE}?{LD}+)*",
    "THINGA": r"[A-Z]+(?:(?:&(?i:amp);|[+&])[A-Z]+)+",
    "THING3": r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?\/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}",
    "HTHING": r"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:{ACRO}\.|[A-Za-z0-9\u00ad]+))+",
    # URLs, e-mail addresses, phone numbers
    "FULLURL": r'(?i:https?):\/\/[^ \t\n\f\r"<>|(){}]+[^ \t\n\f\r"<>|.!?(){},-]',
    "URLTAIL": r'(?:\/[^ \t\n\f\r"<>|()]+[^ \t\n\f\r"<>|.!?(){},-])?',
    "EMAIL": r'(?:&(?i:lt);|<)?[a-zA-Z0-9][^ \t\n\f\r"<>|()\u00a0{}]*@'
    r'(?:[^ \t\n\f\r"<>|(){}.\u00a0]+\.)*[^ \t\n\f\r"<>|(){}.\u00a0]+(?:&(?i:gt);|>)?',
    "PHONE": r"(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0])"
    r"[0-9]{3,4}[- \u00a0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}",
    # punctuation
    "INSENTP": r"[,;:\u3001]",
    "SMILEY": r"[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]]",
    # the characters a word-like rule's match can start with (a filter only)
    "WORD_START": r"{L}|[{WORD_EXTRA}&]",
    "THING_START": r"{LD}|[{WORD_EXTRA}&]",
}


# ------------------------------------------------------------------------------------------------
# Rules, in priority order: the longest match wins, the earlier rule on ties
# ------------------------------------------------------------------------------------------------


class _Rule(NamedTuple):
    """A lexer rule, JFlex's ``pattern/trail { action }``.

    ``pattern`` is a regex, or a tuple of alternatives matched one by one (the longest wins: Python's
    ``|`` takes the first that matches). ``trail`` must follow the match and counts in its length
    but is not consumed. ``first`` matches every character a match can start with (by default the
    pattern itself, right when the first character of any match is a match), and ``needs`` must
    occur somewhere in the text for the rule to apply: both only skip rules that cannot match.
    """

    name: str
    pattern: str | tuple[str, ...]
    action: _Action
    first: str | None = None
    trail: str | None = None
    needs: str | None = None


_R = _Rule  # short, so that most rules fit on one line
_RULES: tuple[_Rule, ...] = (
    _R("proglang", r"(?i:c\+\+|[cf]#)", _keep, "[cCfF]"),
    _R("assim3", r"(?i:cannot|'twas)", _pushback(3), "[cC']"),
    _R(
        "assim2",
        (r"(?i:gonna|gotta|lemme|gimme|wanna)", r"'(?i:tis)"),
        _pushback(2),
        r"[gGlLwW'&\u0092\u2019]",
    ),
    _R("sgml", "{SGML}", _nbsp, "<", needs="<"),
    _R(
        "spmdash",
        r"&(?i:md|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]",
        _const("--"),
        r"[&\u0096\u0097\u2013\u2014\u2015]",
    ),
    _R("spamp", "&(?i:amp);", _const("&"), "&"),
    _R("sppunc", "&(?i:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);", _keep, "&"),
    _R("word_redaux", "{WORD}", _soft, "{WORD_START}", trail="{REDAUX}"),
    _R("sword_sredaux", "{SWORD}", _soft, r"[A-Za-z\u00ad]", trail="{SREDAUX}"),
    _R("word", "{WORD}", _soft, "{WORD_START}"),
    _R(
        "apoword",
        (
            "{APOS}(?i:n){APOS}?",
            "[lLdDjJ]{APOS}",
            "(?i:dunkin|somethin|ol){APOS}",
            "{APOS}(?i:em)",
            "[A-HJ-XZn]{APOSETC}{L}{2,}",
            "{APOS}[2-9]0(?i:s)",
            "{APOS}(?i:till?|cause)",
            "{L}+[aeiouyAEIOUY]{APOSETC}[aeiouA-Z]{L}*",
            r"(?i:cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)",
        ),
        _keep,
        r"{L}|['\u0092\u2019&]",
    ),
    _R("apoword2", "(?i:y){APOS}", _keep, "[yY]", trail="{L}"),
    _R("fullurl", "{FULLURL}", _keep, "[hH]", needs="://"),
    _R(
        "likelyurl",
        (
            r'(?i:www)\.(?:[^ \t\n\f\r"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}{URLTAIL}',
            r"""(?:[^ \t\n\f\r"`'<>|.!?(){},-_$]+\.)+(?i:com|net|org|edu){URLTAIL}""",
        ),
        _keep,
        ".",
        needs=r"(?i:www\.|\.com|\.net|\.org|\.edu)",
    ),
    _R("email", "{EMAIL}", _keep, "[a-zA-Z0-9<&]", needs="@"),
    _R("twitter", "@[a-zA-Z_][a-zA-Z_0-9]*|#{WL}+", _keep, "[@#]"),
    _R("redaux_ctx", "{REDAUX}", _quote_right, r"['\u0092\u2019&]", trail="[^A-Za-z]"),
    _R("sredaux", "{SREDAUX}", _quote_right, "[nN]"),
    _R("date", "{D}{1,2}[-/]{D}{1,2}[-/]{D}{2,4}", _keep, "{D}"),
    _R("number", "[-+]?{NUM}", _soft, r"[-+\d.:,\u00ad\u066b\u066c]"),
    _R(
        "subsupnum",
        r"[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)",
        _keep,
        r"[\u207a\u207b\u208a\u208b\u2070\u00b9\u00b2\u00b3\u2074-\u2079\u2080-\u2089]",
    ),
    _R("frac", r"(?:{D}{1,4}[- \u00a0])?{D}{1,4}(?:\\?\/|\u2044){D}{1,4}", _nbsp, "{D}"),
    _R("frac2", r"[\u00bc\u00bd\u00be\u2153-\u215e]", _fraction),
    _R(
        "tbspec",
        r"-(?:(?i:rrb|lrb|rcb|lcb|rsb|lsb))-|(?i:c\.d\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls)"
        r"|(?i:cap){APOS}(?i:n)|(?i:c){APOS}(?i:est)",
        _amp,
        "[-cCpPaAsS]",
    ),
    _R("thing3", "{THING3}", _keep, "[A-Za-z0-9]", needs="/"),
    _R("dolsign", r"[A-Z]*\$|#", _keep, "[A-Z$#]"),
    _R(
        "dolsign2",
        r"[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
        _currency,
    ),
    _R(
        "acronym",
        r"{ACRO1}\.",
        _acronym,
        "[A-Za-z]",
        trail=r"{SPACENL}+(?:{LOWERCASE_WORDS})(?:{SPACENL}|\Z)",
    ),
    _R("abbrev3", r"{ABBREV3}\.", _keep, "[A-Za-z]", trail="{SPACENL}?{D}"),
    _R("pty_ltd", r"(?i:pt[ey]|co)\.", _keep, "[pPcC]", trail="{SPACE}(?i:ltd|lim)"),
    _R("abbrev1_end", "{ABBREV1}", _sentend_abbrev, "[A-Za-z]", trail="{SENTEND}"),
    _R("abbrev1_mid", "{ABBREV1}", _keep, "[A-Za-z]", trail="(?s:..)"),
    _R("abbrev1", "{ABBREV1}", _sentend_abbrev, "[A-Za-z]"),
    _R("abbrev2", r"{ABBREV4}\.", _keep, "[A-Za-z]"),
    _R("abbrev4", "{ABBREV4}", _keep, "[A-Za-z]", trail="{SPACE}"),
    _R("acro", "{ACRO}", _keep, "[A-Za-z]", trail="{SPACENL}"),
    _R("tbspec2", "{APOS}[0-9][0-9]", _keep, r"['\u0092\u2019&]", trail="{SPACENL}"),
    _R("filename", r"{LD}+(?:\.{LD}+)*\.{FILEEXT}", _keep, "{LD}", trail="{SPACENL}|[.?!,]"),
    _R("word_dot", r"{WORD}\.", _soft, "{WORD_START}", trail="{INSENTP}"),
    _R("phone", "{PHONE}", _phone, "[(+0-9]"),
    _R("dblquot_left", "{DBLQUOT}", _quote_left, '["&]', trail="[A-Za-z0-9$]"),
    _R("dblquot", "{DBLQUOT}", _quote_right, '["&]'),
    _R("del", r"\x7f", _skip),
    _R("lt", "<|&(?i:lt);", _const("<"), "[<&]"),
    _R("gt", ">|&(?i:gt);", _const(">"), "[>&]"),
    _R("smiley", "{SMILEY}", _parens, "[<>:;=]", trail="[^A-Za-z0-9]"),
    _R(
        "asiansmiley",
        (
            r"[\^x=~<>]\.\[(?i:\^x=~<>\])",
            r"[-\^x=~<>']_[-\^x=~<>']",
            r"\([-\^x=~<>'][_.]?[-\^x=~<>']\)",
            r"\([\^x=~<>']-[\^x=~<>'`]\)",
        ),
        _parens,
        "[-^x=~<>'(]",
    ),
    _R("lcb", r"\{", _const("-LCB-")),
    _R("rcb", r"\}", _const("-RCB-")),
    _R("lsb", r"\[", _const("-LSB-")),
    _R("rsb", r"\]", _const("-RSB-")),
    _R("lrb", r"\(", _const("-LRB-")),
    _R("rrb", r"\)", _const("-RRB-")),
    _R("hyphens", "-+", _hyphens),
    _R("ldots", r"\.{3,5}|(?:\.[ \u00a0]){2,4}\.|[\u0085\u2026]", _const("..."), r"[.\u0085\u2026]"),
    _R("fnmarks", "@+|#+|_+", _keep),
    _R("asts", r"\*+|(?:\\\*){1,3}", _keep, r"[*\\]"),
    _R("insentp", "{INSENTP}", _keep),
    _R("qmarks", "[?!]+", _keep),
    _R("period", r"[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]", _keep),
    _R("equals", "=", _keep),
    _R("slash", r"\/", _keep),
    _R("hthing_dot", r"{HTHING}\.", _soft, "[A-Za-z0-9]", trail="{INSENTP}", needs="-"),
    _R("hthing", "{HTHING}", _soft, "[A-Za-z0-9]", needs="-"),
    _R("thing_dot", r"{THING}\.", _keep, "{THING_START}", trail="{INSENTP}"),
    _R("thing", "{THING}", _keep, "{THING_START}"),
    _R("thinga_dot", r"{THINGA}\.", _amp, "[A-Z]", trail="{INSENTP}"),
    _R("thinga", "{THINGA}", _amp, "[A-Z]"),
    _R("quote_left", "'", _quote_left, "'", trail=r"[A-Za-z][^ \t\n\r\u00a0]"),
    _R("redaux", "{REDAUX}", _quote_right, r"['\u0092\u2019&]"),
    _R(
        "quotes",
        (
            "{APOS}",
            "''",
            r"[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094\u201e\u201f\u2039\u203a\u00ab\u00bb]{1,2}",
        ),
        _quote_right,
        r"['\u0092\u2019&`\u2018-\u201f\u0091-\u0094\u2039\u203a\u00ab\u00bb]",
    ),
    _R("duckfeet", "<<|>>", _keep, "[<>]"),
    _R("miscsymbol", "[{MISC_SYMBOL}]", _keep),
    _R("space", r"\x00|{SPACE}+|[\u200b\u200e\u200f\ufeff]", _skip),
    _R("newline", "{NEWLINE}", _const("\n")),
    _R("nbsp", "&(?i:nbsp);", _skip, "&"),
)


# ------------------------------------------------------------------------------------------------
# The lexer
# ------------------------------------------------------------------------------------------------


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


_MACRO_REF = re.compile(r"\{([A-Z][A-Z0-9_]*)\}")  # {NAME}, not a repetition such as {2,4}


def _expander(classes: Mapping[str, str]) -> Callable[[str], str]:
    """A function replacing every {NAME} in a pattern: a class body as it is, a macro (expanded in
    turn) as a group."""
    done: dict[str, str] = {}

    def ref(m: re.Match) -> str:
        name = m.group(1)
        if name in classes:
            return classes[name]
        if name not in done:
            done[name] = f"(?:{expand(_MACROS[name])})"
        return done[name]

    def expand(pattern: str) -> str:
        return _MACRO_REF.sub(ref, pattern)

    return expand


class _LexRule:
    """A compiled ``_Rule``: each alternative's group "t" (if any) is the trailing context."""

    __slots__ = ("name", "alts", "action", "first", "needs")

    def __init__(self, rule: _Rule, expand: Callable[[str], str]) -> None:
        alts = (rule.pattern,) if isinstance(rule.pattern, str) else rule.pattern
        trail = f"(?=(?P<t>{expand(rule.trail)}))" if rule.trail else ""
        self.name = rule.name
        self.alts = [re.compile(f"(?:{expand(a)}){trail}") for a in alts]
        self.action = rule.action
        first = rule.first
        if first is None:
            if not isinstance(rule.pattern, str) or rule.trail:
                raise ValueError(f"rule {rule.name}: alternatives or a trailing context need ``first``")
            first = rule.pattern
        self.first = re.compile(expand(first))
        self.needs = re.compile(rule.needs) if rule.needs else None


@lru_cache(maxsize=1)
def _lexer() -> list[_LexRule]:
    bmp = "".join(map(chr, range(0xD800))) + "".join(map(chr, range(0xE000, 0x10000)))
    numeric = _class_from(c for c in filter(str.isnumeric, bmp) if not c.isdecimal())
    classes = {name: _literal_class(body) for name, body in _CLASSES.items()}
    expand = _expander({**classes, "NUMERIC": numeric})
    return [_LexRule(rule, expand) for rule in _RULES]


_dispatch: dict[str, tuple[_LexRule, ...]] = {}  # first character -> rules whose match can start with it


def _lex(text: str, stop: int, shortcut: bool = True) -> list[str]:
    """PTB tokens of ``text[:stop]`` (``text`` may go on past ``stop`` as trailing context).

    With ``shortcut``, a simple chunk between two spaces is not lexed but taken, already lower-cased
    and without punctuation, from the chunk cache (see ``_tokenize_chunk``).
    """
    rules = _lexer()
    needs_ok: dict[_LexRule, bool] = {}
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
