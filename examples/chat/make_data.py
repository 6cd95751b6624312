"""The chat + RAG example's data: a support assistant that answers from a retrieved context.

    python make_data.py          # writes data/train.jsonl and evals/heldout.jsonl (deterministic)

Each conversation (OpenAI fine-tuning format) has a system prompt, a user turn holding the retrieved
context and a question, and the answer; a quarter are two-question conversations. The facts are few
(prices, delivery times, account steps) so a ~0.5 M-parameter model learns them in about a minute
on a CPU. The eval cases ask the same facts with other wordings, carry the context as `context`
(for RAG metrics) and a tag per topic (`billing`, `shipping`, `account`) for per-segment gates.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "You are Acme support. Answer from the context in a few words."
FACTS = {
    "billing": [
        (f"the {plan} plan", f"The {plan} plan costs {price} a month.", f"{price} a month")
        for plan, price in [("Basic", "$5"), ("Plus", "$9"), ("Pro", "$20"), ("Team", "$45"), ("Max", "$80")]
    ],
    "shipping": [
        (f"to {place}", f"Delivery to {place} takes {days} days.", f"{days} days")
        for place, days in [("Spain", "3"), ("Japan", "9"), ("Brazil", "12"), ("Canada", "5"), ("Kenya", "14")]
    ],
    "account": [
        (topic, f"To {topic}, {how}.", how)
        for topic, how in [
            ("reset my password", "use the Forgot link"),
            ("delete my account", "email privacy@acme.test"),
            ("change my email", "open Settings then Profile"),
            ("add a teammate", "open Team then Invite"),
        ]
    ],
}
# training wordings, and the held-out ones the eval asks with
ASK = {
    "billing": (["How much is {x}?", "What does {x} cost?", "Price of {x}?"],
                ["How much do I pay for {x}?", "What is the price of {x}?"]),
    "shipping": (["How long is delivery {x}?", "Shipping time {x}?", "When will it arrive {x}?"],
                 ["How many days does shipping {x} take?", "How long does delivery {x} take?"]),
    "account": (["How do I {x}?", "How can I {x}?", "I want to {x}."],
                ["What is the way to {x}?", "How should I {x}?"]),
}  # fmt: skip


def turn(topic: str, fact: tuple[str, str, str], wording: str) -> tuple[dict[str, str], dict[str, str]]:
    key, context, answer = fact
    user = {"role": "user", "content": f"Context: {context}\nQuestion: {wording.format(x=key)}"}
    return user, {"role": "assistant", "content": answer}


def train_rows(n: int, rnd: random.Random) -> list[dict[str, object]]:
    rows = []
    for i in range(n):
        topic = rnd.choice(sorted(FACTS))
        fact = rnd.choice(FACTS[topic])
        messages = [{"role": "system", "content": SYSTEM}]
        if i % 4 == 0:  # multi-turn: an earlier question and answer come first
            t2 = rnd.choice(sorted(FACTS))
            messages += turn(t2, rnd.choice(FACTS[t2]), rnd.choice(ASK[t2][0]))
        messages += turn(topic, fact, rnd.choice(ASK[topic][0]))
        rows.append({"id": f"train-{i:03d}", "messages": messages, "tags": [topic]})
    return rows


def eval_rows() -> list[dict[str, object]]:
    rows = []
    for topic in sorted(FACTS):
        for j, fact in enumerate(FACTS[topic]):
            for k, wording in enumerate(ASK[topic][1]):  # never a training wording: no leakage
                user, answer = turn(topic, fact, wording)
                rows.append({
                    "id": f"{topic}-{j}-{k}",
                    "messages": [{"role": "system", "content": SYSTEM}, user, answer],
                    "context": [fact[1]],
                    "tags": [topic],
                })  # fmt: skip
    return rows


def main(root: Path = Path(__file__).resolve().parent) -> None:
    rnd = random.Random(0)
    (root / "data").mkdir(exist_ok=True)
    (root / "evals").mkdir(exist_ok=True)
    for path, rows in [
        (root / "data" / "train.jsonl", train_rows(320, rnd)),
        (root / "evals" / "heldout.jsonl", eval_rows()),
    ]:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {path.relative_to(root)} ({len(rows)} conversations)")


if __name__ == "__main__":
    main()
