"""The built-in synthetic corpus: two invented languages, generated offline in seconds.

Both languages express the same kind of meaning (who does what to whom, where, when and
why), drawn by one shared generator from a lexicon of ~550 concepts with Zipf-like
frequencies. Verbs choose their subjects and objects by semantic class (people eat food,
things fall), each document has a topic that biases its vocabulary, and an entity once
introduced comes back later as a definite noun phrase or a pronoun.

- ``en_synth`` (language A, English-like): SVO, articles, adjectives before nouns, plural -s,
  third-person -s, past -ed (some verbs irregular), do-support in questions and negation,
  adverbs in -ly, time words at the end.
- ``es_synth`` (language B, Spanish-like): grammatical gender with agreeing articles and
  adjectives, adjectives after nouns, verbs conjugated for person, number and tense, dropped
  subject pronouns, object clitics before the verb, verb-first questions in ¿...?, adverbs in
  -mente, time words often at the start.

Content words are built from each language's own syllables, so the two share almost no word
forms. The lexicon comes from a fixed seed (the languages never change); the corpus seed only
changes which documents are drawn.
"""

from __future__ import annotations

import json
import os
import random
import re
from bisect import bisect
from dataclasses import dataclass, field
from functools import cache
from itertools import accumulate
from pathlib import Path

from selfreplay.errors import SelfReplayError

LANGUAGES: tuple[str, str] = ("en_synth", "es_synth")
LEXICON_SEED = 1729  # fixed, so the two languages are the same whatever the corpus seed
CLASSES = ("person", "animal", "food", "thing", "place")
NOUNS = {"person": 40, "animal": 50, "food": 50, "thing": 120, "place": 50}
NUM_VERBS, NUM_ADJECTIVES, NUM_TOPICS = 150, 110, 16
TOPIC_BIAS = 0.7  # chance that a content word comes from the document's topic, not the whole lexicon
ZIPF = 1.1  # the concept of rank r (within its kind) has frequency proportional to 1 / (r + 1) ** ZIPF
# Tables below index tense as 0 past, 1 present, 2 future, and person as 0..5: 1sg 2sg 3sg 1pl 2pl 3pl.

VERB_FRAMES = [  # (subject classes, object classes); no object classes: intransitive
    (("person",), ("food",)), (("person", "animal"), ("food",)), (("person",), ("thing",)),
    (("person",), ("thing", "food")), (("person",), ("person", "animal")), (("person",), ("place",)),
    (("person", "animal"), ("person", "animal")), (("person", "animal"), ()), (("thing",), ()),
    (("animal",), ("thing", "food")), (("person",), ()),
]
PREPOSITIONS = [  # (A, B, classes of the noun that follows)
    ("in", "en", ("place",)), ("near", "cerca de", ("place", "thing")), ("under", "bajo", ("thing",)),
    ("with", "con", ("person", "animal", "thing")), ("behind", "detrás de", ("place", "thing", "person")),
    ("without", "sin", ("person", "thing", "food")), ("for", "para", ("person",)), ("from", "desde", ("place",)),
]
CONJUNCTIONS = [("because", "porque"), ("when", "cuando"), (", although", ", aunque"), ("and", "y"),
                (", but", ", pero"), ("while", "mientras")]
TIME_WORDS = [  # by tense: the time word agrees with the tense
    [("yesterday", "ayer"), ("earlier", "antes"), ("once", "una vez")],
    [("today", "hoy"), ("now", "ahora"), ("always", "siempre"), ("often", "a menudo"), ("sometimes", "a veces")],
    [("tomorrow", "mañana"), ("soon", "pronto"), ("later", "luego")],
]
NUMBERS = [("two", "dos"), ("three", "tres"), ("four", "cuatro"), ("five", "cinco"), ("six", "seis"),
           ("seven", "siete"), ("eight", "ocho"), ("nine", "nueve"), ("ten", "diez"), ("twelve", "doce")]
EN_PRONOUNS = (("I", "you", "it", "we", "you", "they"), ("me", "you", "it", "us", "you", "them"))
EN_BE = (("was", "were", "was", "were", "were", "were"), ("am", "are", "is", "are", "are", "are"))
ES_PRONOUNS = {0: "yo", 1: "tú", 3: "nosotros", 4: "vosotros"}  # third person: ES_THIRD, by gender
ES_THIRD, ES_CLITICS = ("él", "ella", "ellos", "ellas"), ("lo", "la", "los", "las")
ES_SER = (("era", "eras", "era", "éramos", "erais", "eran"), ("soy", "eres", "es", "somos", "sois", "son"),
          ("seré", "serás", "será", "seremos", "seréis", "serán"))
ES_ENDINGS = {  # past (preterite) and present endings by verb class; the future adds FUTURE to the infinitive
    "ar": (("é", "aste", "ó", "amos", "asteis", "aron"), ("o", "as", "a", "amos", "áis", "an")),
    "er": (("í", "iste", "ió", "imos", "isteis", "ieron"), ("o", "es", "e", "emos", "éis", "en")),
    "ir": (("í", "iste", "ió", "imos", "isteis", "ieron"), ("o", "es", "e", "imos", "ís", "en")),
}
ES_FUTURE = ("é", "ás", "á", "emos", "éis", "án")
ES_ARTICLES = {"a": ("un", "una", "unos", "unas"), "the": ("el", "la", "los", "las"),
               "this": ("este", "esta", "estos", "estas"), "my": ("mi", "mi", "mis", "mis")}
# every word of the tables above and of the renderers below, so that no content word can coincide with one
FUNCTION_WORDS = set(re.findall(r"[^\W\d_]+", str([PREPOSITIONS, CONJUNCTIONS, TIME_WORDS, NUMBERS, EN_PRONOUNS, EN_BE,
                     ES_PRONOUNS, ES_THIRD, ES_CLITICS, ES_SER, ES_ARTICLES]))) | set(
                     "the an some these that will not do does did he she him her be no que del al".split())

EN_ONSETS = "b bl br c ch cl cr d dr f fl fr g gl gr h j k l m n p pl pr r s sc sh sk sl sm sn sp st str sw " \
            "t th tr tw v w wh y".split()
EN_VOWELS = "a e i o u a e i o u ee oo ea ai oa ou oi aw".split()
EN_CODAS = "b ck d ff ft g k ld lk ll lt m mp nd ng nk nt p rd rk rn rt sh sk sp ss st t th tch x".split()
ES_ONSETS = "b c ch d f g j l ll m n ñ p r s t v z br bl cr cl dr fr gr pl pr tr".split()
ES_VOWELS = "a e i o u a e i o u ia ie io ue ua".split()
ES_FINALS = "b c ch d g j l ll m n ñ p r rr s t v z".split()
ACUTE = str.maketrans("aeiou", "áéíóú")


def _en_word(rng: random.Random, syllables: int) -> str:
    word = "" if rng.random() < 0.1 else rng.choice(EN_ONSETS)
    for k in range(syllables - 1):
        word += rng.choice(EN_VOWELS) + rng.choice(("", "n", "r", "l", "s", "m")) + rng.choice(EN_ONSETS)
    if rng.random() < 0.15:  # a "magic e": brake, stone
        return word + rng.choice("aeiou") + rng.choice("bdklmnpstvz") + "e"
    return word + rng.choice(EN_VOWELS) + rng.choice(EN_CODAS)


def _es_stem(rng: random.Random, syllables: int, accent: float = 0.0) -> str:
    """Syllables ending in a consonant, ready for an ending; `accent`: chance of an accented first syllable."""
    parts = [rng.choice(ES_ONSETS) + rng.choice(ES_VOWELS) + ("" if rng.random() < 0.8 else rng.choice("nrsl"))
             for _ in range(syllables)]
    if rng.random() < 0.1:
        parts[0] = parts[0].lstrip("bcdfgjlmnñprstvz")  # a vowel-initial word
    if syllables > 1 and parts[0][-1] in "aeiou" and rng.random() < accent:
        parts[0] = parts[0][:-1] + parts[0][-1].translate(ACUTE)
    stem, final = "".join(parts), rng.choice(ES_FINALS)
    return stem + ("r" if final == "rr" and stem[-1] not in "aeiou" else final)  # rr only between vowels


def _plural_s(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "sh", "ch", "tch")) else "s")


def _es_plural(word: str) -> str:
    if word.endswith("ón"):
        return word[:-2] + "ones"
    return word + ("s" if word[-1] in "aeiouáéíóú" else "es")


def _en_noun(rng: random.Random) -> tuple[str, str]:
    singular = _en_word(rng, rng.choice((1, 1, 2)))
    return singular, _plural_s(singular)


def _es_noun(rng: random.Random, gender: str, person: bool) -> tuple[str, str]:
    """Mostly -o masculine, -a feminine (always for people); other endings leave the gender to be memorised."""
    if person or rng.random() < 0.75:
        ending = "o" if gender == "m" else "a"
    else:
        ending = rng.choice(("e", "or", "ón", "al") if gender == "m" else ("e", "idad", "ación", "ud"))
    singular = _es_stem(rng, rng.choice((1, 2, 2)), accent=0.15) + ending
    return singular, _es_plural(singular)


def _en_verb(rng: random.Random) -> tuple[str, str, str]:
    base = _en_word(rng, 1 if rng.random() < 0.7 else 2)
    past = base + ("d" if base.endswith("e") else "ed")
    if rng.random() < 0.15:  # an irregular past by a vowel change, like sing/sang
        vowel = re.search(r"[aeiou]+", base).group()
        past = base.replace(vowel, rng.choice([v for v in EN_VOWELS if v != vowel]), 1)
    return base, _plural_s(base), past


def _es_verb(rng: random.Random) -> tuple[str, ...]:
    """All 18 forms, index tense * 6 + person."""
    infinitive = _es_stem(rng, rng.choice((1, 2, 2))) + rng.choice(("ar", "ar", "ar", "er", "ir"))
    stem, past_present = infinitive[:-2], ES_ENDINGS[infinitive[-2:]]
    return tuple(stem + e for e in past_present[0] + past_present[1]) + tuple(infinitive + e for e in ES_FUTURE)


def _en_adjective(rng: random.Random) -> tuple[str, str]:
    adj = _en_word(rng, 1 if rng.random() < 0.6 else 2) + rng.choice(("", "", "", "", "y", "ish", "ful"))
    return adj, (adj[:-1] + "ily" if adj.endswith("y") else adj + "ly")


def _es_adjective(rng: random.Random) -> tuple[str, ...]:
    """(masculine, feminine, masculine plural, feminine plural, adverb in -mente)."""
    stem = _es_stem(rng, rng.choice((1, 2, 2)))
    if rng.random() < 0.7:
        forms = (stem + "o", stem + "a", stem + "os", stem + "as")
    else:
        word = stem + rng.choice(("e", "al", "ente", "il"))
        forms = (word, word, _es_plural(word), _es_plural(word))
    return forms + (forms[1] + "mente",)


def _fresh(used: set[str], make) -> tuple:
    """Forms from make() sharing no word with any form made before, in either language."""
    while True:
        forms = make()
        if used.isdisjoint(forms):
            used.update(forms)
            return forms


@dataclass
class Lexicon:
    noun_class: list[str] = field(default_factory=list)
    gender: list[str] = field(default_factory=list)  # "m"/"f": sex of people, grammatical gender in B otherwise
    en_noun: list[tuple] = field(default_factory=list)  # (singular, plural)
    es_noun: list[tuple] = field(default_factory=list)
    verb_frame: list[int] = field(default_factory=list)  # index into VERB_FRAMES
    en_verb: list[tuple] = field(default_factory=list)
    es_verb: list[tuple] = field(default_factory=list)
    en_adj: list[tuple] = field(default_factory=list)
    es_adj: list[tuple] = field(default_factory=list)
    pools: dict = field(default_factory=dict)  # key -> (items, cumulative Zipf weights)


def _pool(items: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [i for i, _ in items], list(accumulate(w for _, w in items))


def _draw(rng: random.Random, pool: tuple[list[int], list[float]]) -> int:
    items, cumulative = pool
    return items[bisect(cumulative, rng.random() * cumulative[-1])]


@cache
def _lexicon() -> Lexicon:
    rng, used, lex = random.Random(LEXICON_SEED), set(FUNCTION_WORDS), Lexicon()
    nouns, verbs, adjectives = [], [], []  # (index, topic or applicable classes, Zipf weight)
    for cls, count in NOUNS.items():
        for rank in range(count):
            lex.noun_class.append(cls)
            lex.gender.append(rng.choice("mf"))
            lex.en_noun.append(_fresh(used, lambda: _en_noun(rng)))
            lex.es_noun.append(_fresh(used, lambda: _es_noun(rng, lex.gender[-1], cls == "person")))
            nouns.append((len(nouns), rng.randrange(NUM_TOPICS), (rank + 1) ** -ZIPF))
    for rank in range(NUM_VERBS):
        lex.verb_frame.append(rng.randrange(len(VERB_FRAMES)))
        lex.en_verb.append(_fresh(used, lambda: _en_verb(rng)))
        lex.es_verb.append(_fresh(used, lambda: _es_verb(rng)))
        verbs.append((rank, rng.randrange(NUM_TOPICS), (rank + 1) ** -ZIPF))
    for rank in range(NUM_ADJECTIVES):
        lex.en_adj.append(_fresh(used, lambda: _en_adjective(rng)))
        lex.es_adj.append(_fresh(used, lambda: _es_adjective(rng)))
        adjectives.append((rank, rng.sample(CLASSES, rng.choice((1, 2, 2, 3))), (rank + 1) ** -ZIPF))
    pools = {}  # a key with None draws from the whole lexicon, one with a topic from that topic's words
    for topic in (None, *range(NUM_TOPICS)):
        pools["verb", topic] = [(i, w) for i, t, w in verbs if topic in (None, t)]
        for cls in CLASSES:
            pools["noun", topic, cls] = [(i, w) for i, t, w in nouns if topic in (None, t) and lex.noun_class[i] == cls]
    for cls in (None, *CLASSES):
        pools["adj", cls] = [(i, w) for i, classes, w in adjectives if cls is None or cls in classes]
        pools["verb_for", cls] = [(i, w) for i, _, w in verbs if cls in VERB_FRAMES[lex.verb_frame[i]][0]]
    lex.pools = {key: _pool(items) for key, items in pools.items() if items}
    return lex


def _content(rng: random.Random, lex: Lexicon, kind: str, topic: int, *key) -> int:
    local = lex.pools.get((kind, topic, *key))
    return _draw(rng, local if local and rng.random() < TOPIC_BIAS else lex.pools[(kind, None, *key)])


def _noun_phrase(rng: random.Random, lex: Lexicon, doc: dict, classes: tuple, depth: int) -> dict:
    """An entity of one of `classes`: one from earlier sentences (definite or a pronoun) or a new one."""
    old = [e for e in doc["old"] if lex.noun_class[e[0]] in classes] if rng.random() < 0.45 else None
    if old:
        noun, plural = rng.choice(old)
        det = "pron" if rng.random() < 0.4 else "this" if rng.random() < 0.15 else "the"
        return {"noun": noun, "plural": plural, "person": 5 if plural else 2, "det": det, "num": 0, "adj": None,
                "rel": None}
    cls = rng.choice(classes)
    noun, plural = _content(rng, lex, "noun", doc["topic"], cls), rng.random() < 0.3
    det = rng.choice(("a", "a", "the", "my", "num") if plural else ("a", "a", "the", "my"))
    if (noun, plural) in doc["old"] or (noun, plural) in doc["new"]:
        det = "the"
    doc["new"].append((noun, plural))
    adj = _draw(rng, lex.pools["adj", cls]) if rng.random() < 0.35 else None
    phrase = {"noun": noun, "plural": plural, "person": 5 if plural else 2, "det": det,
              "num": rng.randrange(len(NUMBERS)), "adj": adj, "rel": None}
    if depth == 0 and rng.random() < 0.12 and ("verb_for", cls) in lex.pools:
        phrase["rel"] = _clause(rng, lex, doc, 1, head=phrase)  # "the dog that ate the bread"
    return phrase


def _clause(rng: random.Random, lex: Lexicon, doc: dict, depth: int, head: dict | None = None) -> dict:
    c = {"tense": rng.randrange(3), "neg": rng.random() < 0.15, "verb": None, "obj": None, "adj": None,
         "pp": None, "adv": None, "rel": head is not None}
    if head is None and rng.random() < 0.2:  # "the dogs were small"
        c["subj"] = _noun_phrase(rng, lex, doc, CLASSES, depth)
        c["adj"] = _draw(rng, lex.pools["adj", lex.noun_class[c["subj"]["noun"]]])
        return c
    if head is None:
        c["verb"] = _content(rng, lex, "verb", doc["topic"])
    else:
        c["verb"] = _draw(rng, lex.pools["verb_for", lex.noun_class[head["noun"]]])
    subj_classes, obj_classes = VERB_FRAMES[lex.verb_frame[c["verb"]]]
    if head is None and "person" in subj_classes and rng.random() < 0.2:  # I, you, we
        person = rng.choice((0, 1, 3, 4))
        head = {"noun": None, "plural": person > 2, "person": person, "det": "pron"}
    c["subj"] = head or _noun_phrase(rng, lex, doc, subj_classes, depth)
    if obj_classes:
        c["obj"] = _noun_phrase(rng, lex, doc, obj_classes, depth)
    if rng.random() < 0.25:
        p = rng.randrange(len(PREPOSITIONS))
        c["pp"] = (p, _noun_phrase(rng, lex, doc, PREPOSITIONS[p][2], 1))
    r = rng.random()
    if r < 0.2:
        c["adv"] = ("time", rng.randrange(len(TIME_WORDS[c["tense"]])))
    elif r < 0.3:
        c["adv"] = ("manner", _draw(rng, lex.pools["adj", None]))
    return c


def _sentence(rng: random.Random, lex: Lexicon, doc: dict) -> dict:
    s = {"main": _clause(rng, lex, doc, 0), "question": rng.random() < 0.12, "sub": None}
    if not s["question"] and rng.random() < 0.25:
        s["sub"] = (rng.randrange(len(CONJUNCTIONS)), _clause(rng, lex, doc, 1))
    doc["old"] += doc["new"]  # entities of this sentence can be referred back to from the next
    doc["new"] = []
    return s


def _en_np(lex: Lexicon, phrase: dict, case: int = 0) -> str:
    """English noun phrase; case 0 subject, 1 object."""
    noun, plural = phrase["noun"], phrase["plural"]
    if phrase["det"] == "pron":
        if noun is not None and not plural and lex.noun_class[noun] == "person":
            return (("he", "him"), ("she", "her"))[lex.gender[noun] == "f"][case]
        return EN_PRONOUNS[case][phrase["person"]]
    words = [lex.en_adj[phrase["adj"]][0]] if phrase["adj"] is not None else []
    words.append(lex.en_noun[noun][plural])
    det = {"the": "the", "my": "my", "this": "these" if plural else "this", "num": NUMBERS[phrase["num"]][0],
           "a": "some" if plural else "an" if words[0][0] in "aeiou" else "a"}[phrase["det"]]
    text = det + " " + " ".join(words)
    return text + " that " + _en_clause(lex, phrase["rel"]) if phrase["rel"] else text


def _en_clause(lex: Lexicon, c: dict, question: bool = False) -> str:
    tense, person = c["tense"], c["subj"]["person"]
    if c["verb"] is None:
        aux, main = ("will", ["be"]) if tense == 2 else (EN_BE[tense][person], [])
    else:
        base, third, past = lex.en_verb[c["verb"]]
        if tense == 2:
            aux, main = "will", [base]
        elif c["neg"] or question:
            aux, main = ("did", "does" if person == 2 else "do")[tense], [base]
        else:
            aux, main = None, [(past, third if person == 2 else base)[tense]]
    words = [] if c["rel"] else [_en_np(lex, c["subj"])]
    words = [aux] + words if question else words + ([aux] if aux else [])
    words += (["not"] if c["neg"] else []) + main
    if c["adj"] is not None:
        words.append(lex.en_adj[c["adj"]][0])
    if c["obj"]:
        words.append(_en_np(lex, c["obj"], 1))
    kind, which = c["adv"] or (None, None)
    if kind == "manner":
        words.append(lex.en_adj[which][1])
    if c["pp"]:
        words += [PREPOSITIONS[c["pp"][0]][0], _en_np(lex, c["pp"][1], 1)]
    if kind == "time":
        words.append(TIME_WORDS[tense][which][0])
    return " ".join(words)


def _es_np(lex: Lexicon, phrase: dict, rng: random.Random, role: str = "subj") -> str:
    """Spanish noun phrase; role is "subj", "obj" or "prep"."""
    noun, plural = phrase["noun"], phrase["plural"]
    g = 2 * plural + (noun is not None and lex.gender[noun] == "f")  # index into (m, f, m pl, f pl) forms
    if phrase["det"] == "pron":  # object pronouns are clitics, placed by _es_clause
        if role == "obj" or role == "subj" and (rng.random() < 0.6 or noun is not None
                                                 and lex.noun_class[noun] != "person"):
            return ""  # subject pronouns are mostly dropped: the verb ending says who
        return ES_THIRD[g] if noun is not None else ES_PRONOUNS[phrase["person"]]
    det = NUMBERS[phrase["num"]][1] if phrase["det"] == "num" else ES_ARTICLES[phrase["det"]][g]
    text = det + " " + lex.es_noun[noun][plural]
    if phrase["adj"] is not None:
        text += " " + lex.es_adj[phrase["adj"]][g]
    if phrase["rel"]:
        text += " que " + _es_clause(lex, phrase["rel"], rng)
    return ("a " if role == "obj" and lex.noun_class[noun] == "person" else "") + text  # the personal "a"


def _es_clause(lex: Lexicon, c: dict, rng: random.Random, question: bool = False) -> str:
    tense, subj, obj = c["tense"], c["subj"], c["obj"]
    person = subj["person"]
    verb = ES_SER[tense][person] if c["verb"] is None else lex.es_verb[c["verb"]][tense * 6 + person]
    group = ["no"] if c["neg"] else []
    if obj and obj["det"] == "pron":  # a clitic before the verb, agreeing with its antecedent: "no la comió"
        group.append(ES_CLITICS[2 * obj["plural"] + (lex.gender[obj["noun"]] == "f")])
    group.append(verb)
    kind, which = c["adv"] or (None, None)
    if kind == "manner":
        group.append(lex.es_adj[which][4])
    subject = "" if c["rel"] else _es_np(lex, subj, rng)
    words = ([*group, subject] if question else [subject, *group])
    if c["adj"] is not None:
        gender = subj["noun"] is not None and lex.gender[subj["noun"]] == "f"
        words.append(lex.es_adj[c["adj"]][2 * subj["plural"] + gender])
    if obj:
        words.append(_es_np(lex, obj, rng, "obj"))
    if c["pp"]:
        words += [PREPOSITIONS[c["pp"][0]][1], _es_np(lex, c["pp"][1], rng, "prep")]
    if kind == "time":
        time = TIME_WORDS[tense][which][1]
        words = [time + ","] + words if not question and not c["rel"] and rng.random() < 0.6 else words + [time]
    return " ".join(w for w in words if w)


def _render(lex: Lexicon, s: dict, language: str, rng: random.Random) -> str:
    if language == LANGUAGES[0]:
        text = _en_clause(lex, s["main"], s["question"])
        if s["sub"]:
            text += " " + CONJUNCTIONS[s["sub"][0]][0] + " " + _en_clause(lex, s["sub"][1])
        text = text.replace(" ,", ",")
        return text[0].upper() + text[1:] + ("?" if s["question"] else ".")
    text = _es_clause(lex, s["main"], rng, s["question"])
    if s["sub"]:
        text += " " + CONJUNCTIONS[s["sub"][0]][1] + " " + _es_clause(lex, s["sub"][1], rng)
    text = text.replace(" de el ", " del ").replace(" a el ", " al ").replace(" ,", ",")
    text = text[0].upper() + text[1:]
    return "¿" + text + "?" if s["question"] else text + "."


def generate_documents(language: str, num_words: int, seed: int = 0) -> list[str]:
    """Documents (each a string of 3-12 sentences on one topic) totalling about num_words words."""
    if language not in LANGUAGES:
        raise SelfReplayError(f"unknown synthetic language {language!r}: choose one of {', '.join(LANGUAGES)}")
    rng, lex = random.Random(f"{language}/{seed}"), _lexicon()
    documents, words = [], 0
    while words < num_words:
        doc = {"topic": rng.randrange(NUM_TOPICS), "old": [], "new": []}
        text = " ".join(_render(lex, _sentence(rng, lex, doc), language, rng) for _ in range(rng.randint(3, 12)))
        documents.append(text)
        words += text.count(" ") + 1
    return documents


def write_corpus(out_dir: str | Path, num_words: int = 1_000_000, seed: int = 0) -> dict[str, Path]:
    """Write out_dir/<language>.jsonl for each language, one {"text": ...} per line; returns {language: path}.

    num_words is per language. Each file is written to a temporary file first and then renamed,
    so a reader never sees half a corpus.
    """
    out_dir = Path(out_dir)
    if num_words <= 0:
        raise SelfReplayError(f"--words must be a positive number of words per language, got {num_words}")
    if out_dir.exists() and not out_dir.is_dir():
        raise SelfReplayError(f"{out_dir} is a file, not a directory: choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for language in LANGUAGES:
        documents = generate_documents(language, num_words, seed)
        path, temporary = out_dir / f"{language}.jsonl", out_dir / f".{language}.jsonl.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in documents)
        os.replace(temporary, path)
        paths[language] = path
    return paths
