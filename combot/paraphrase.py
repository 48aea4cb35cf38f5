"""The offline paraphraser: reflects the participant's words back in the second person."""

from __future__ import annotations

import random
import re

# The participant's words seen from the bot: first person becomes second and second person first.
_FIRST_TO_SECOND = {
    "i": "you", "me": "you", "my": "your", "mine": "yours", "myself": "yourself",
    "we": "you", "us": "you", "our": "your", "ours": "yours", "ourselves": "yourselves",
    "i'm": "you're", "im": "you're", "i've": "you've", "ive": "you've", "i'd": "you'd", "i'll": "you'll",
    "we're": "you're", "we've": "you've", "we'd": "you'd", "we'll": "you'll",
}
_SECOND_TO_FIRST = {
    "your": "my", "yours": "mine", "yourself": "myself", "yourselves": "ourselves",
    "you're": "I'm", "youre": "I'm", "you've": "I've", "you'd": "I'd", "you'll": "I'll",
}
# Verbs that agree with the new subject: "I was" -> "you were", "you were" -> "I was".
_AFTER_FIRST = {"am": "are", "was": "were", "wasn't": "weren't"}
_AFTER_SECOND = {"are": "am", "were": "was", "weren't": "wasn't", "aren't": "am not"}
# The same verbs before their subject, in a question: "are you" -> "am I", "was I" -> "were you".
_BEFORE_FIRST = {"am": "are", "was": "were", "wasn't": "weren't"}
_BEFORE_SECOND = {"are": "am", "were": "was", "weren't": "wasn't", "aren't": "aren't"}
# Verbs whose complement can be a clause without "that": the "you" after them is that clause's
# subject when a verb follows ("I hope you fix this" -> "you hope I fix this"), an object otherwise
# ("I want you to refund me" -> "you want me to refund you", "I know you" -> "you know me").
_CLAUSE_VERBS = {
    "hope", "hoped", "hopes", "think", "thought", "thinks", "wish", "wished", "want", "wanted", "need", "needed",
    "expect", "expected", "know", "knew", "believe", "believed", "said", "say", "says", "guess", "suppose",
    "feel", "felt", "bet", "swear", "doubt", "assume", "assumed", "realise", "realised", "realize", "realized",
    "understand", "mean", "noticed", "heard", "promised", "pray", "trust", "demand", "insist", "suggest",
}
# Words that cannot be the verb of such a clause: after "want you", "to" makes "you" an object.
_NOT_A_VERB = {
    "to", "the", "a", "an", "my", "your", "his", "her", "their", "our", "its", "this", "that", "these", "those",
    "some", "any", "all", "it", "them", "him", "me", "us", "so", "very", "too", "for", "about", "with", "at",
    "in", "on", "of", "from", "and", "or", "but", "because", "as", "like", "back", "again", "well", "more",
    "much", "here", "there", "now", "today", "personally", "anything", "something", "nothing", "everything",
    "gone", "out", "up", "off", "by", "into", "than", "then", "if", "when", "", "guys", "people",
}
# "you" is a subject ("I") at the start of a clause or before a verb, otherwise an object ("me").
_CLAUSE_OPENERS = {
    "and", "but", "or", "so", "because", "since", "when", "if", "that", "while", "though", "although", "until",
    "unless", "whether", "as", "once", "then", "where", "why", "how", "what", "can", "could", "would", "will",
    "did", "do", "does", "should", "have", "had", "were", "are", "whenever", "before", "after",
    "aren't", "weren't", "don't", "didn't", "doesn't", "haven't", "won't", "wouldn't", "can't", "couldn't",
    "shouldn't",
}
_SUBJECT_FOLLOWERS = {
    "would", "will", "can", "could", "should", "shall", "might", "must", "may", "did", "didn't", "do", "don't",
    "does", "doesn't", "have", "haven't", "had", "hadn't", "are", "aren't", "were", "weren't", "never", "always",
    "just", "only", "still", "also", "said", "told", "sent", "lost", "promised", "charged", "keep", "kept", "won't", "wouldn't", "can't", "couldn't", "shouldn't", "really", "clearly", "obviously",
}
# Words said before the point ("Yes,", "Well", "Ok so", "Um,"): dropped from the front.
_FILLERS = {"ok", "okay", "um", "umm", "uh", "uhm", "erm", "hmm", "hm", "ugh", "hey", "hi", "hello", "yeah", "yep",
            "yup", "sure", "alright", "oh", "ah", "wow", "lol"}
# Dropped from the front only before a comma or the start of a clause ("No, they ..." but "No one ...";
# "Honestly I think ..." and "Basically, the sofa ..." but "Honestly speaking").
_SOFT_FILLERS = {"yes", "no", "well", "so", "and", "right", "anyway", "anyways", "also", "honestly", "basically",
                 "actually", "frankly", "seriously", "look", "listen", "now", "fine", "sadly", "unfortunately",
                 "tbh", "btw", "ps", "anyhow", "essentially", "firstly", "dear", "greetings"}
# Greetings of two words ("Good evening,", "Hi there") dropped from the front like one-word ones.
_GREETING = re.compile(r"(?:good\s+(?:morning|afternoon|evening|day|night)|(?:hi|hello|hey|hiya)\s+there|"
                       r"to\s+whom\s+it\s+may\s+concern|long\s+story\s+short|first\s+of\s+all|"
                       r"dear\s+(?:sir\s+or\s+madam|sir/madam|sir|madam|team|all))\b[,.!?;:]*\s+", re.IGNORECASE)
# After a greeting, a name said to the bot ("Hi Combot, ...", "Hello everyone, ...") goes too.
_ADDRESSED = {"hi", "hello", "hey", "hiya", "dear"}
_CLAUSE_STARTS = {"i", "we", "my", "our", "the", "a", "an", "they", "he", "she", "it", "this", "that", "there",
                  "basically", "then", "i'm", "i've", "i'd", "i'll", "we're", "after", "when", "last", "yesterday",
                  "their", "his", "her", "its", "so", "you", "your"}
# Hedges said about oneself: dropped ("they were slow I guess" -> "they were slow").
_HEDGE = re.compile(r"(?:^|(?<=\s)|(?<=,))\s*,?\s*\bI\s+(?:guess|suppose)\b\s*,?|,\s*I\s+think\s*$", re.IGNORECASE)
# Common words that start a sentence in lower case when it becomes part of the bot's; any other
# capitalised first word (Amazon, FedEx, Brightmart) is taken for a name and keeps its capital.
_COMMON_STARTS = set("""
the a an it its this that these those they them their he she his her him you your yours we there here so then
last yesterday today tonight recently when after before on in at about during since because as if while though
although well basically honestly apparently actually literally really also just only even still never always
once twice first second third next every everything nothing nobody no none not all both each many most some
several one two three four five six seven eight nine ten my our ordered bought got went had have has was were
is are did do does called tried waited paid spent received asked sent made took came arrived left returned
booked complained contacted emailed phoned gave found noticed used customer customers delivery package parcel
order orders staff service services shipping product products item items shop store stores company the
support seller sellers manager waiter waitress cashier clerk driver courier website app phone bank airline
hotel restaurant people someone somebody everyone everybody anyone nothing something long to be frankly sadly
unfortunately luckily suddenly eventually finally instead meanwhile overall again already almost maybe perhaps
thank thanks please sorry can could would will should why what how who which where whenever get
am aren't wasn't weren't isn't haven't don't didn't doesn't can't won't listen look
afterwards afterward later earlier soon sometimes usually often nowhere somehow somewhere anything
anybody until unless without despite whatever half few less more much enough such other another either
neither
""".split())
_QUOTED = re.compile(r'"[^"]*"|\u201c[^\u201d]*\u201d')
_TOKEN = re.compile(r"[A-Za-z']+|[^A-Za-z']+")
_MAX_WORDS = 30


def _sentences(text: str) -> list[str]:
    return [part for part in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if part]


def _first_sentence(text: str) -> str:
    parts = _sentences(text)
    sentence = parts[0] if parts else ""
    # A greeting such as "Hi!" or "Good morning." says little: use the next sentence when there is one.
    if len(sentence.split()) <= 2 and len(parts) > 1:
        sentence = parts[1]
    return sentence


def _drop_fillers(sentence: str) -> str:
    """'Ok so I bought ...' -> 'I bought ...'; 'No, they never ...' -> 'they never ...'; 'No one ...' stays."""
    while True:
        greeting = _GREETING.match(sentence)
        if greeting:
            sentence = sentence[greeting.end():]
            continue
        match = re.match(r"([A-Za-z']+)([,.!?;:]*)\s+(\S+)", sentence)
        if not match:
            return sentence
        word, punctuation, following = match.group(1).lower(), match.group(2), match.group(3).lower().strip(",.!?")
        if word in _ADDRESSED and not punctuation and re.fullmatch(r"[A-Za-z']+,", match.group(3)) and \
                following not in _CLAUSE_STARTS:
            sentence = sentence[match.end(3):].lstrip()  # "Hi Combot, the ..." -> "the ..."
            continue
        soft_ok = punctuation or following in _CLAUSE_STARTS or following in _FILLERS or following in _SOFT_FILLERS
        if word in _FILLERS or (word in _SOFT_FILLERS and soft_ok):
            sentence = sentence[match.start(3):]
        else:
            return sentence


def _swap_persons(sentence: str) -> str:
    """First person to second and second to first, word by word, with the verbs that agree."""
    tokens = _TOKEN.findall(sentence)
    words = [i for i, t in enumerate(tokens) if t[0].isalpha() or t[0] == "'"]
    out = list(tokens)
    subject: str | None = None  # "first"/"second": the last pronoun swapped was a subject of that person

    def neighbour(position: int, step: int) -> str:
        index = words.index(position) + step
        return tokens[words[index]].lower() if 0 <= index < len(words) else ""

    def agree_before(position: int, verbs: dict[str, str]) -> None:
        """'are you' -> 'am I': the verb right before the swapped subject, in a question."""
        index = words.index(position)
        if index == 0:
            return
        before = words[index - 1]
        verb = tokens[before].lower()
        if verb in verbs and not "".join(tokens[before + 1:position]).strip():
            new = verbs[verb]
            out[before] = new.capitalize() if tokens[before][:1].isupper() else new

    def starts_clause(position: int) -> bool:
        index = words.index(position)
        if index == 0:
            return True
        between = "".join(tokens[words[index - 1] + 1:position])
        return any(mark in between for mark in ",;:") or tokens[words[index - 1]].lower() in _CLAUSE_OPENERS

    for position in words:
        token = tokens[position]
        lower = token.lower()
        replacement: str | None = None
        if lower in _FIRST_TO_SECOND:
            replacement = _FIRST_TO_SECOND[lower]
            subject = "first" if lower in ("i", "we") else None
            if subject:
                agree_before(position, _BEFORE_FIRST)
        elif lower == "you":
            following = neighbour(position, 1)
            if following in ("guys", "people"):  # "you guys lost it", "with you people": the company
                after = words[words.index(position) + 1]
                out[after] = out[after - 1] = ""
                following = neighbour(position, 2)
            in_clause = neighbour(position, -1) in _CLAUSE_VERBS and following not in _NOT_A_VERB
            if starts_clause(position) or following in _SUBJECT_FOLLOWERS or in_clause:
                replacement, subject = "I", "second"
                agree_before(position, _BEFORE_SECOND)
            else:
                replacement, subject = "me", None
        elif lower in _SECOND_TO_FIRST:
            replacement = _SECOND_TO_FIRST[lower]
            subject = None
        elif subject == "first" and lower in _AFTER_FIRST:
            replacement, subject = _AFTER_FIRST[lower], None
        elif subject == "second" and lower in _AFTER_SECOND:
            replacement, subject = _AFTER_SECOND[lower], None
        else:
            subject = subject if lower in ("never", "always", "really", "just", "still", "also") else None
        if replacement is not None:
            if token.isupper() and len(token) > 1 and replacement != "I":
                replacement = replacement.upper()
            out[position] = replacement
    return "".join(out)


# A message that starts with the verb ("waited 3 weeks", "charged twice") leaves out its subject,
# the participant: it is put back.
_ACTIVE_START = {"waited", "ordered", "bought", "paid", "called", "tried", "spent", "received", "asked", "returned",
                 "booked", "complained", "contacted", "emailed", "phoned", "rang", "went", "visited", "wanted",
                 "needed", "expected", "purchased", "requested", "reported", "chatted", "queued"}
_PASSIVE_START = {"charged", "billed", "overcharged", "ignored", "refused", "denied", "treated", "scammed",
                  "cheated", "shouted", "yelled", "hung", "overlooked", "insulted", "blamed", "misled"}


def _put_back_subject(text: str) -> str:
    first = text.split(" ", 1)[0].lower()
    if first in _ACTIVE_START:
        return "you " + text[:1].lower() + text[1:]
    if first in _PASSIVE_START:
        return "you were " + text[:1].lower() + text[1:]
    return text


# A contraction's first part is the word that decides ("That's" -> "that", "Couldn't" -> "could").
_CONTRACTION = re.compile(r"(?:'s|'re|'ll|'d|'ve|'m|n't)$", re.IGNORECASE)
_OPENS_SENTENCE = tuple(".!?:;\"(\u201c")


def _used_as(word: str, original: str) -> str | None:
    """How the participant wrote `word` where case tells something (not at the start of a sentence):
    "common" when in lower case somewhere, "name" when always capitalised; None when nowhere."""
    seen: set[str] = set()
    for match in re.finditer(rf"(?<![A-Za-z']){re.escape(word)}(?![A-Za-z'])", original, re.IGNORECASE):
        before = original[:match.start()].rstrip()
        if not before or before.endswith(_OPENS_SENTENCE):
            continue
        seen.add("common" if match.group(0)[:1].islower() else "name")
    if "common" in seen:
        return "common"
    return "name" if seen else None


def _lower_first(text: str, original: str = "") -> str:
    """The reflection goes mid-sentence: its first word loses its capital unless it is "I", quoted,
    an acronym, or a name. A common word (or its contraction: "That's") is never taken for a name; any
    other capitalised word is one (Amazon, FedEx, Brightmart) unless the participant wrote it in lower
    case elsewhere, or it looks like a verb or adverb (-ed, -ing, -ly) and is never capitalised
    mid-sentence."""
    first = text.split(" ", 1)[0]
    if not first[:1].isupper():  # lower case already, or quoted speech ("Leave me alone" ...)
        return text
    if first in ("I", "I'm", "I've", "I'd", "I'll") or (len(first) > 1 and first.isupper()):
        return text
    bare = first.strip("'\"(").lower()
    stem = _CONTRACTION.sub("", bare) or bare
    if any(word in _COMMON_STARTS or word in _FIRST_TO_SECOND or word in _SECOND_TO_FIRST for word in (bare, stem)):
        return first.lower() + text[len(first):]
    used = _used_as(first.strip("'\"("), original) if original else None
    if used == "common" or (used is None and first[1:].islower() and stem.endswith(("ed", "ing", "ly"))):
        return first.lower() + text[len(first):]
    return text


def reflect(text: str) -> str:
    """Turn 'Ok so I ordered a lamp and my box was crushed!' into 'you ordered a lamp and your box was crushed'.

    Quoted speech stays as it was said; greetings and fillers in front are dropped, and so are
    hedges such as "I guess"; the result starts in lower case unless it starts with a name or "I".
    """
    sentence = _first_sentence(text)
    words = sentence.split()
    if len(words) > _MAX_WORDS:
        sentence = " ".join(words[:_MAX_WORDS]) + " ..."
    sentence = _drop_fillers(sentence)
    # Quoted speech is kept as said: set aside while the persons are swapped.
    quotes: list[str] = []

    def hold(match: re.Match[str]) -> str:
        quotes.append(match.group(0))
        return f"\x00{len(quotes) - 1}\x00"

    sentence = _QUOTED.sub(hold, sentence)
    sentence = _HEDGE.sub("", sentence).strip()
    sentence = _swap_persons(sentence)
    sentence = re.sub("\x00(\\d+)\x00", lambda m: quotes[int(m.group(1))], sentence)
    result = " ".join(sentence.split()).strip().rstrip(" .!?,;:")
    result = re.sub(r"\s+([,;:])", r"\1", result)
    result = _put_back_subject(_lower_first(result, text))
    return result or "you had a bad experience"


# A reply of a few words ("no", "yes it was") reads badly as a reflection.
MIN_REFLECTION_WORDS = 4


def paraphrase(text: str, templates: tuple[str, ...], rng: random.Random, short_templates: tuple[str, ...] = ()) -> str:
    """Fill one template at random with the reflection of the participant's text.

    For a very short message, a template from `short_templates` is used instead when there is one.
    """
    return choose_paraphrase(text, templates, rng, short_templates)[0]


def choose_paraphrase(text: str, templates: tuple[str, ...], rng: random.Random, short_templates: tuple[str, ...] = (),
                      used: tuple[str, ...] = ()) -> tuple[str, str]:
    """`paraphrase`, avoiding the templates in `used` while others remain; also returns the one chosen.

    Templates are named "t<i>" (of `templates`) and "s<i>" (of `short_templates`). A conversation
    keeps the names it used, so the bot does not say the same sentence twice (a fixed short text,
    or a template without {reflection}) until it has said every other one.
    """
    reflection = reflect(text)
    prefix = "t"
    if short_templates and len(reflection.split()) < MIN_REFLECTION_WORDS:
        templates, prefix = short_templates, "s"
    fresh = [i for i in range(len(templates)) if f"{prefix}{i}" not in used] or list(range(len(templates)))
    choice = rng.choice(fresh)
    return fill(templates[choice], reflection), f"{prefix}{choice}"


def fill(template: str, reflection: str) -> str:
    """Put the reflection (which starts in lower case unless it starts with a name or "I") into the
    template; where the template starts a sentence with it, it gets a capital."""
    parts = template.split("{reflection}")
    out = parts[0]
    for part in parts[1:]:
        starts_sentence = not out.strip() or out.rstrip().endswith((".", "!", "?"))
        out += (reflection[:1].upper() + reflection[1:] if starts_sentence else reflection) + part
    return out
