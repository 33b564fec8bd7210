"""Calibration text for activation-aware quantization (int4_requant.py).

Only the magnitude of each input channel's activations is taken from it, so it needs
to be ordinary, varied text, not a benchmark: conversation through the checkpoint's
own chat template, prose, and code. Written for this project; held apart from the
text `bench.int4_fidelity` measures the result on.
"""

from __future__ import annotations

CHATS = [
    ("How do I make a cup of tea?",
     "Boil fresh water, pour it over a tea bag in a cup, let it steep for three to five "
     "minutes, then take the bag out and add milk or sugar if you like."),
    ("Summarize the plot of Romeo and Juliet.",
     "Two young lovers from feuding families in Verona marry in secret, but a chain of "
     "misunderstandings leads to both of their deaths, which finally reconciles their families."),
    ("What are the benefits of regular exercise?",
     "Regular exercise strengthens the heart and muscles, improves mood and sleep, helps "
     "control weight, and lowers the risk of many chronic diseases."),
    ("Can you help me write an email asking my manager for a day off next Friday?",
     "Subject: Day off request for Friday\n\nHi Sam,\n\nI would like to take next Friday off "
     "for a family matter. My tasks are on track, and Alex has agreed to cover any urgent "
     "requests. Please let me know if that works.\n\nThanks,\nJordan"),
    ("Translate 'good morning, how are you?' into French and Spanish.",
     "French: « Bonjour, comment allez-vous ? »\nSpanish: «¡Buenos días! ¿Cómo estás?»"),
    ("What is 17 times 23?",
     "17 × 23 = 391. One way to see it: 17 × 20 = 340 and 17 × 3 = 51, and 340 + 51 = 391."),
]

TEXTS = [
    "Machine learning is a field of study in artificial intelligence concerned with the "
    "development of statistical algorithms that can learn from data and generalize to unseen "
    "data, and thus perform tasks without explicit instructions.",
    "The mitochondrion is an organelle found in the cells of most eukaryotes. It generates most "
    "of the chemical energy needed to power the cell's biochemical reactions, stored in a small "
    "molecule called adenosine triphosphate.",
    "Once upon a time, in a small village at the edge of a great forest, there lived a young girl "
    "who loved to explore. Every morning she walked among the tall trees and listened to the birds, "
    "and every evening she told her grandmother what she had seen.",
    "import numpy as np\n\n\ndef softmax(x):\n    e = np.exp(x - x.max())\n    return e / e.sum()\n\n\n"
    "print(softmax(np.array([1.0, 2.0, 3.0])))\n",
    "git checkout -b feature/login\ngit add src/login.py tests/test_login.py\n"
    "git commit -m \"Add login form validation\"\ngit push origin feature/login\n",
    "The train left the station at 7:45 and arrived in the city two hours and ten minutes later. "
    "Tickets cost 24 euros for adults and 12 for children; bicycles travel free outside rush hour.",
    "<html>\n  <body>\n    <h1>Weekly report</h1>\n    <ul>\n      <li>Orders: 1,204 (+8%)</li>\n"
    "      <li>Returns: 37</li>\n    </ul>\n  </body>\n</html>\n",
]
