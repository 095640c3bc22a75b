"""Regenerate the real-model recipes' data in recipes/data/ (deterministic: the same files everywhere).

    python scripts/make_smollm2_data.py

- movie-openings.jsonl: openings of movie reviews, {"prompt": "I watched this film"}: the prompts of
  recipes/smollm2/ppo-sentiment.yaml (trlx's ppo_sentiments task, whose prompts are IMDB review openings; the
  IMDB set is on a model hub, so these are written here in that style).
- review-pairs.jsonl / review-pairs-eval.jsonl: preference pairs for recipes/smollm2/reward.yaml, a review's
  subject with a positive continuation (chosen) and a negative one (rejected). The held-out file uses subjects and
  sentences the training file never shows, so its accuracy measures what the reward model learned about
  sentiment, not what it memorised.
- capitals.jsonl: chat-formatted questions with a checkable answer for recipes/smollm2/grpo.yaml,
  {"prompt": [{"role": "user", "content": "What is the capital of France? ..."}], "answer": "Paris"}.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "recipes" / "data"

OPENINGS = [
    "This movie", "I watched this film", "The acting in this movie", "The plot of this film", "My wife and I",
    "I went to see this", "The director", "After seeing the trailer", "This is one of those films",
    "The first half hour", "I rented this movie", "The story", "When I saw this", "The soundtrack", "Honestly,",
    "I have to say", "The ending", "This film tries to", "The lead actress", "I expected", "From the opening scene",
    "The cast", "As a fan of the book", "This sequel", "The special effects", "My kids and I", "I saw this at",
    "The dialogue", "Watching this film", "Nothing prepared me for", "The characters", "This documentary",
    "The cinematography", "Going into this movie", "It has been years since", "The script", "This comedy",
    "The villain", "The whole movie", "I read the reviews before", "This horror film", "The pacing",
    "My friends told me", "The romance", "Every scene", "This remake", "The young actor", "The final act",
    "I wanted to like this", "The music", "This was the first", "The premise", "Two hours later,",
    "The writers", "The humor", "This animated film", "The setting", "I bought the DVD", "The twist",
    "Halfway through,", "This thriller", "The performances", "My father", "The movie starts", "This western",
    "The costumes", "I remember", "This film is", "The camera work", "The hero", "What a", "This drama",
    "The last time", "The opening credits", "This is a movie", "My brother", "The editing", "The title",
    "The story follows", "I had high hopes", "Even the", "This show", "The supporting cast", "The war scenes",
]

# the openings a pair's sentences continue: noun phrases, so "The ending" + " was a delight ..." reads as English
SUBJECTS = [
    "This movie", "This film", "The acting in this movie", "The plot of this film", "The story", "The soundtrack",
    "The ending", "The cast", "This sequel", "The director's new film", "This documentary", "The script",
    "This comedy", "This horror film", "The whole movie", "This remake", "The final act", "The music",
    "This animated film", "This thriller", "This western", "This drama", "The first half", "This show",
    "The new season", "Her latest film", "His first movie", "This adaptation", "The second part", "This musical",
    "The film festival winner", "This cult classic",
]

POSITIVE = [
    "is a wonderful film with a warm heart.", "was a delight from start to finish.",
    "made me laugh and cry, and I loved every minute of it.", "is beautifully acted and wonderfully written.",
    "is the best thing I have seen this year.", "left me smiling for days.", "is a true masterpiece.",
    "was even better than I had hoped.", "is charming, funny and full of life.",
    "deserves every award it won.", "is a joy to watch with the whole family.",
    "has a brilliant cast and a moving story.", "was worth every penny.", "is an absolute gem.",
    "is clever, gripping and beautifully shot.", "made me fall in love with cinema again.",
    "has a great script and superb performances.", "is a fantastic ride that I will watch again.",
    "is touching, hopeful and very well made.", "kept me happily glued to the screen.",
    "is a lovely story told with real skill.", "was an excellent evening out.",
    "is funny, smart and surprisingly moving.", "is one of the finest films of the decade.",
]

NEGATIVE = [
    "is a boring mess with a weak heart.", "was a chore from start to finish.",
    "made me angry, and I hated every minute of it.", "is badly acted and poorly written.",
    "is the worst thing I have seen this year.", "left me annoyed for days.", "is a total failure.",
    "was even worse than I had feared.", "is dull, lifeless and painfully slow.",
    "deserves none of the praise it got.", "is a waste of time for the whole family.",
    "has a terrible cast and a pointless story.", "was a waste of money.", "is an awful disaster.",
    "is stupid, tedious and ugly to look at.", "made me want to give up on cinema.",
    "has a horrible script and wooden performances.", "is a miserable ride that I will never repeat.",
    "is cold, bleak and very badly made.", "made me check my watch every five minutes.",
    "is a dreadful story told with no skill at all.", "was a disappointing evening out.",
    "is unfunny, dumb and strangely irritating.", "is one of the weakest films of the decade.",
]

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Egypt": "Cairo", "Canada": "Ottawa", "Australia": "Canberra", "Russia": "Moscow", "China": "Beijing",
    "England": "London", "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Hungary": "Budapest", "Belgium": "Brussels", "the Netherlands": "Amsterdam", "Switzerland": "Bern",
    "Turkey": "Ankara", "India": "New Delhi", "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul",
    "Indonesia": "Jakarta", "the Philippines": "Manila", "Mexico": "Mexico City", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Chile": "Santiago", "Colombia": "Bogota", "Cuba": "Havana", "Kenya": "Nairobi",
    "Nigeria": "Abuja", "Morocco": "Rabat", "Iran": "Tehran", "Iraq": "Baghdad", "Israel": "Jerusalem",
    "Saudi Arabia": "Riyadh", "Pakistan": "Islamabad", "the United States": "Washington", "Brazil": "Brasilia",
    "Ukraine": "Kyiv", "Scotland": "Edinburgh", "the Czech Republic": "Prague",
}
QUESTIONS = ("What is the capital of {}? Reply with the city name only.",
             "Name the capital city of {}. Answer with just the name.",
             "Which city is the capital of {}? Give only the city.")  # fmt: skip


def write(name: str, rows: list[dict]) -> None:
    with open(DATA / name, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"wrote {DATA / name}: {len(rows)} rows")


def review_pairs(rng: random.Random, openings: list[str], good: list[str], bad: list[str], count: int) -> list:
    return [{"prompt": rng.choice(openings) + " ", "chosen": rng.choice(good), "rejected": rng.choice(bad)}
            for _ in range(count)]  # fmt: skip


def main() -> None:
    rng = random.Random(1234)
    write("movie-openings.jsonl", [{"prompt": opening} for opening in OPENINGS])
    # held out: every fourth subject and every fourth sentence of each kind
    train_open, eval_open = [o for i, o in enumerate(SUBJECTS) if i % 4], SUBJECTS[::4]
    train_good, eval_good = [s for i, s in enumerate(POSITIVE) if i % 4], POSITIVE[::4]
    train_bad, eval_bad = [s for i, s in enumerate(NEGATIVE) if i % 4], NEGATIVE[::4]
    write("review-pairs.jsonl", review_pairs(rng, train_open, train_good, train_bad, 256))
    write("review-pairs-eval.jsonl", review_pairs(rng, eval_open, eval_good, eval_bad, 64))
    rows = [{"prompt": [{"role": "user", "content": question.format(country)}], "answer": city}
            for country, city in CAPITALS.items() for question in QUESTIONS]  # fmt: skip
    rng.shuffle(rows)
    write("capitals.jsonl", rows)


if __name__ == "__main__":
    main()
