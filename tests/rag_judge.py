"""What a sensible judge answers to the RAG, safety and relevancy prompts of deepeval and ragas.

The judge server of test_judges.py calls `rag_answer` for every prompt. No LLM is available
offline, so the judgement is made from the texts in the prompt: a statement is supported by a
context when most of its words are in it, an opinion is toxic or biased when it holds a word from
a short list, a generated question is the response turned into one. The answers follow the inputs,
so a metric scores a good answer and a bad one differently, and a test can fail.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

TOXIC = {"idiot", "stupid", "moron", "worthless", "shut"}
BIASED = {"women", "immigrants", "elderly", "obviously", "naturally"}
REASON = json.dumps({"reason": "The score follows from the verdicts."})


def words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 3}


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def supported(claim: str, context: str) -> bool:
    """Most of the claim's words are in the context."""
    mine = words(claim)
    return bool(mine) and len(mine & words(context)) >= 0.5 * len(mine)


NEGATIONS = {"not", "cannot", "never", "no", "none"}


def contradicts(claim: str, context: str) -> bool:
    """About the same thing (a shared word) but one says not: a missing detail is no contradiction."""
    negated = {w for w in re.findall(r"[a-z]+", claim.lower())} & NEGATIONS
    negated_ctx = {w for w in re.findall(r"[a-z]+", context.lower())} & NEGATIONS
    return bool(words(claim) & words(context)) and bool(negated) != bool(negated_ctx)


def _between(text: str, start: str, end: str) -> str:
    i = text.rfind(start)
    if i < 0:
        return ""
    i += len(start)
    j = text.find(end, i)
    return text[i : j if j >= 0 else len(text)].strip()


def _listed(text: str) -> list[str]:
    """A list as deepeval renders it into a prompt (JSON or a Python repr), else one item a line."""
    for parse in (json.loads, ast.literal_eval):
        try:
            value: Any = parse(text)
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, list):
            return [str(v) for v in value]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _ragas_input(prompt: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        _between(prompt, "Now perform the same with the following input\ninput: ", "\nOutput:")
    )
    return data


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def rag_answer(prompt: str) -> str | None:  # noqa: PLR0911 - one branch per prompt
    """The judge's answer to a deepeval or ragas RAG/safety/relevancy prompt, or None for other prompts."""
    # ---- ragas (collections): the input is a JSON object after "Now perform the same ..."
    if "Break down each sentence into one or more fully understandable statements" in prompt:
        return json.dumps({"statements": sentences(_ragas_input(prompt)["answer"])})
    if "judge the faithfulness of a series of statements based on a given context" in prompt:
        data = _ragas_input(prompt)
        verdicts = [
            {"statement": s, "reason": "checked against the context", "verdict": int(supported(s, data["context"]))}
            for s in data["statements"]
        ]
        return json.dumps({"statements": verdicts})
    if "verify if the context was useful in arriving at the given answer" in prompt:
        data = _ragas_input(prompt)
        useful = supported(data["answer"], data["context"]) or bool(words(data["context"]) & words(data["question"]))
        return json.dumps({"reason": "compared the context with the answer", "verdict": int(useful)})
    if "classify if the statement can be attributed to the given context" in prompt:
        data = _ragas_input(prompt)
        rows = [
            {"statement": s, "reason": "looked for it in the context", "attributed": int(supported(s, data["context"]))}
            for s in sentences(data["answer"])
        ]
        return json.dumps({"classifications": rows})
    if "Generate a question for the given answer and identify if the answer is noncommittal" in prompt:
        response = str(_ragas_input(prompt)["response"])
        vague = any(p in response.lower() for p in ("don't know", "not sure", "it depends"))
        return json.dumps({"question": f"Is it true that {response.rstrip('.!? ')}?", "noncommittal": int(vague)})
    # ---- deepeval
    if "The score is <" in prompt or "Below is a list of Contradictions" in prompt:  # every metric's reason step
        return REASON
    if "please generate a comprehensive list of" in prompt and "truths" in prompt:  # faithfulness: context truths
        return json.dumps({"truths": sentences(_between(prompt, "Text:\n", "\n\nJSON:"))})
    if "can inferred from the provided actual AI output" in prompt:  # faithfulness: the output's claims
        return json.dumps({"claims": sentences(_between(prompt, "AI Output:\n", "\n\nJSON:"))})
    if "whether EACH claim contradicts any facts in the retrieval context" in prompt:
        context = _between(prompt, "Retrieval Contexts:\n", "\n\nClaims:")
        claims = _listed(_between(prompt, "Claims:\n", "\n\nJSON:"))
        return json.dumps({"verdicts": [{"verdict": _yes(supported(c, context)), "reason": "checked"} for c in claims]})
    if "whether the given 'actual output' agrees with EACH context" in prompt:  # hallucination
        contexts = _listed(_between(prompt, "Contexts:\n", "\n\nActual Output:"))
        output = _between(prompt, "Actual Output:\n", "\n\nJSON:")
        verdicts = [{"verdict": _yes(not contradicts(output, c)), "reason": "compared"} for c in contexts]
        return json.dumps({"verdicts": verdicts})
    if "each statement found in the context is relevant to the provided input" in prompt:  # contextual relevancy
        question = words(_between(prompt, "Input:\n", "\n\nContext:"))
        context = _between(prompt, "Context:\n", "\n\nJSON:")
        verdicts = [
            {"statement": s, "verdict": _yes(bool(words(s) & question)), "reason": "about the input or not"}
            for s in sentences(context)
        ]
        return json.dumps({"verdicts": verdicts})
    if "please generate a list of OPINIONS" in prompt:  # toxicity and bias: every sentence is an opinion here
        return json.dumps({"opinions": sentences(_between(prompt, "Text:\n", "\n\nJSON:"))})
    for kind, lexicon in (("toxic", TOXIC), ("biased", BIASED)):
        if f"indicate whether EACH opinion is {kind}" in prompt:
            opinions = _listed(_between(prompt, "Opinions:\n", "\n\nJSON:"))
            verdicts = [{"verdict": _yes(bool(words(o) & lexicon)), "reason": f"{kind} words"} for o in opinions]
            return json.dumps({"verdicts": verdicts})
    return None
