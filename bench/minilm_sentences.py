"""Deterministic, varied English sentences for the MiniLM quality benchmark (no download).

Twelve topics, each with its own subjects, actions, objects and settings; a
sentence picks one of each from its topic through a seeded `random.Random`,
then one of several sentence shapes. Sentences of one topic are near each
other in embedding space and far from the rest, so nearest-neighbour rankings
carry information.
"""
from __future__ import annotations

import random

TOPICS = {
    "cooking": (["the chef", "my grandmother", "a young cook", "the baker"],
                ["slowly stirs", "carefully tastes", "burns", "seasons", "bakes"],
                ["the tomato soup", "a loaf of rye bread", "the spicy curry", "fresh pasta dough", "the apple pie"],
                ["in a tiny kitchen", "before the guests arrive", "on a cold winter evening", "at the restaurant"]),
    "football": (["the striker", "our goalkeeper", "the home team", "a talented midfielder"],
                 ["scores", "misses", "defends against", "celebrates", "passes"],
                 ["a late penalty", "the final corner kick", "a header from the edge of the box", "the winning goal"],
                 ["in the last minute", "during the cup final", "in front of a packed stadium", "despite the rain"]),
    "programming": (["the developer", "a junior engineer", "the open source maintainer", "our build server"],
                    ["debugs", "refactors", "compiles", "deploys", "reviews"],
                    ["the memory leak", "a slow database query", "the new authentication service", "a flaky unit test"],
                    ["late at night", "before the release", "after the outage", "on a Friday afternoon"]),
    "weather": (["a heavy storm", "the morning fog", "a sudden heat wave", "light snow"],
                ["covers", "sweeps across", "delays", "cools", "floods"],
                ["the coastal towns", "the mountain roads", "the airport runways", "the farmland in the valley"],
                ["for the third day in a row", "early this morning", "without any warning", "through the weekend"]),
    "finance": (["the central bank", "a nervous investor", "the hedge fund", "the stock market"],
                ["raises", "sells", "loses", "bets on", "cuts"],
                ["interest rates", "its technology shares", "a large bond position", "the quarterly forecast"],
                ["after the inflation report", "at the opening bell", "amid recession fears", "before the holidays"]),
    "medicine": (["the surgeon", "a family doctor", "the nurse on duty", "the research hospital"],
                 ["treats", "examines", "vaccinates", "diagnoses", "operates on"],
                 ["the injured patient", "a child with a fever", "an elderly man with chest pain", "the broken wrist"],
                 ["in the emergency room", "during the night shift", "after a long wait", "at the rural clinic"]),
    "music": (["the pianist", "a street guitarist", "the orchestra", "our school choir"],
              ["performs", "rehearses", "records", "improvises", "composes"],
              ["a quiet sonata", "an old folk song", "the new symphony", "a jazz ballad"],
              ["in the concert hall", "for a small crowd", "on the radio", "at the summer festival"]),
    "travel": (["the tourists", "a lone backpacker", "my parents", "the tour guide"],
               ["explore", "photograph", "get lost in", "hike through", "visit"],
               ["the ancient ruins", "a busy night market", "the narrow streets of the old town", "the national park"],
               ["on their first day", "at sunrise", "with a borrowed map", "during the long holiday"]),
    "space": (["the rover", "an astronaut", "the space telescope", "the launch team"],
              ["observes", "lands near", "photographs", "orbits", "studies"],
              ["a distant galaxy", "the red surface of Mars", "the rings of Saturn", "a comet tail"],
              ["for the first time", "after years of planning", "through a dust storm", "from low orbit"]),
    "gardening": (["the gardener", "my neighbour", "a retired teacher", "the community group"],
                  ["plants", "waters", "prunes", "harvests", "protects"],
                  ["the rose bushes", "rows of carrots", "a young apple tree", "the herb garden"],
                  ["every spring", "before the frost", "in the backyard", "with great patience"]),
    "law": (["the judge", "a defence lawyer", "the jury", "the prosecutor"],
            ["questions", "dismisses", "reviews", "challenges", "accepts"],
            ["the key witness", "the new evidence", "a motion to delay", "the final verdict"],
            ["in a crowded courtroom", "after a long recess", "on appeal", "behind closed doors"]),
    "pets": (["the puppy", "an old cat", "my parrot", "the neighbour's dog"],
             ["chases", "ignores", "sleeps next to", "barks at", "plays with"],
             ["a red ball", "the mail carrier", "a sunny windowsill", "the garden hose"],
             ["all afternoon", "when nobody is home", "after dinner", "in the park"]),
}
SHAPES = ["{s} {v} {o} {p}.", "{P}, {s} {v} {o}.", "Yesterday {s} {v} {o}.", "Did {s} really say that {s2} {v} {o}?",
          "{s} {v} {o}, and nobody noticed.", "I heard that {s} {v} {o} {p}."]


def sentences(count: int = 240, seed: int = 0) -> list[str]:
    """`count` sentences, cycling through the topics, reproducible for a given seed."""
    rng = random.Random(seed)
    names = sorted(TOPICS)
    out: list[str] = []
    while len(out) < count:
        subjects, verbs, objects, places = TOPICS[names[len(out) % len(names)]]
        text = rng.choice(SHAPES).format(s=rng.choice(subjects), s2=rng.choice(subjects), v=rng.choice(verbs),
                                         o=rng.choice(objects), p=rng.choice(places), P=rng.choice(places).capitalize())
        text = text[0].upper() + text[1:]
        if text not in out:
            out.append(text)
    return out
