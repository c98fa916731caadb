"""The demo's synthetic instruction corpus: every instruction answered in all 8 style combinations.

A response is built from three independent style decisions, one per preference axis:
- expertise (P1A elementary / P1B knowledgeable): the wording of every content sentence;
- informativeness (P2A concise / P2B informative): one short core sentence, or the core sentence
  followed by background sentences joined with explanatory connectives;
- style (P3A friendly / P3B unfriendly): a friendly or curt opener and closer.
So an expert fine-tuned on one side of one axis learns one distinct, scoreable feature, and a
composite preference needs all three decisions right: what a mixture of experts must learn.
"""

import random
from dataclasses import dataclass

from mope.preferences import default_registry

COMBINATIONS = tuple(p.code for p in default_registry().combinations())

# (name, elementary definition, knowledgeable definition)
TOPICS = (
    (
        "the sun",
        "a big hot ball of light in the sky",
        "a main-sequence star sustained by thermonuclear fusion",
    ),
    (
        "rain",
        "water that falls down from the clouds",
        "precipitation produced by condensation and coalescence",
    ),
    (
        "a volcano",
        "a mountain that can spit out hot rock",
        "a geological vent releasing magma and pyroclastic material",
    ),
    (
        "the moon",
        "a big round rock that goes around the earth",
        "a tidally locked natural satellite in synchronous rotation",
    ),
    (
        "a rainbow",
        "a band of colors you see after rain",
        "an optical phenomenon caused by dispersion and refraction",
    ),
    (
        "plants",
        "living things that grow from seeds and need sun",
        "photosynthetic eukaryotes converting irradiance into biomass",
    ),
    (
        "the heart",
        "a part of your body that pumps blood",
        "a muscular organ generating rhythmic electrophysiological contractions",
    ),
    (
        "bees",
        "small bugs that make honey and visit flowers",
        "eusocial hymenopterans performing entomophilous pollination",
    ),
    (
        "snow",
        "soft white ice that falls when it is cold",
        "crystalline precipitation formed through heterogeneous nucleation",
    ),
    (
        "a computer",
        "a machine that helps you play and work",
        "a programmable architecture executing instructions on digital circuits",
    ),
    (
        "the ocean",
        "a huge body of salty water",
        "a stratified hydrosphere governed by thermohaline circulation",
    ),
    ("wind", "air that moves fast outside", "atmospheric advection driven by pressure gradients"),
    (
        "a battery",
        "a small box that keeps power for toys",
        "an electrochemical cell storing energy through redox reactions",
    ),
    (
        "dinosaurs",
        "big animals that lived a long time ago",
        "extinct archosaurian reptiles dominating Mesozoic ecosystems",
    ),
    (
        "sleep",
        "the time when you rest and dream at night",
        "a homeostatic neurophysiological state regulated by circadian rhythms",
    ),
    (
        "music",
        "sounds that people sing and play for fun",
        "organized acoustic structures characterized by harmonic frequencies",
    ),
    (
        "a magnet",
        "a thing that pulls some metal to it",
        "a ferromagnetic material exhibiting aligned magnetic domains",
    ),
    (
        "the brain",
        "the part of your head that helps you think",
        "a neural organ integrating synaptic signals across cortical networks",
    ),
    (
        "ice",
        "water that gets hard when it is cold",
        "a crystalline solid phase exhibiting hexagonal hydrogen bonding",
    ),
    (
        "a tree",
        "a tall plant with a trunk and leaves",
        "a perennial lignified organism with secondary vascular growth",
    ),
    ("fire", "hot light that burns wood", "an exothermic oxidation reaction sustaining combustion"),
    (
        "the stars",
        "little lights that shine in the night sky",
        "luminous plasma spheres characterized by stellar nucleosynthesis",
    ),
    (
        "a bridge",
        "a road that goes over water",
        "a structural span distributing loads through tension and compression",
    ),
    (
        "bread",
        "soft food made from flour and baked",
        "a leavened matrix produced through yeast fermentation and gelatinization",
    ),
    (
        "a cloud",
        "a white puff of water up in the sky",
        "an aerosol of condensed droplets suspended within the troposphere",
    ),
    (
        "the earth",
        "the big round home where we all live",
        "a differentiated terrestrial planet with convective mantle dynamics",
    ),
    (
        "a river",
        "water that runs along the land to the sea",
        "a fluvial channel transporting sediment through hydrodynamic processes",
    ),
    (
        "a robot",
        "a machine that can move and help people",
        "an autonomous electromechanical system implementing control algorithms",
    ),
    (
        "thunder",
        "the loud boom you hear in a storm",
        "an acoustic shockwave generated by rapid thermal expansion of plasma",
    ),
    (
        "a seed",
        "a tiny thing that grows into a plant",
        "an embryonic propagule encapsulating endosperm for germination",
    ),
    (
        "milk",
        "a white drink that comes from cows",
        "an emulsified secretion containing casein micelles and lactose",
    ),
    (
        "the wheel",
        "a round thing that helps carts roll",
        "a rotational mechanism reducing friction through axial bearings",
    ),
    (
        "a frog",
        "a small green animal that hops and swims",
        "an anuran amphibian undergoing metamorphosis from aquatic larvae",
    ),
    (
        "the internet",
        "a way for computers to talk to each other",
        "a packet-switched infrastructure implementing layered protocols",
    ),
    (
        "gravity",
        "the pull that makes things fall down",
        "a fundamental interaction described by spacetime curvature",
    ),
    (
        "a spider",
        "a small bug with eight legs that makes webs",
        "an arachnid synthesizing proteinaceous silk through spinnerets",
    ),
    (
        "a wind turbine",
        "a big fan that makes power from wind",
        "a generator converting aerodynamic lift into electrical energy",
    ),
    (
        "a vaccine",
        "a shot that helps your body fight germs",
        "an immunological preparation inducing adaptive antibody responses",
    ),
    (
        "chocolate",
        "a sweet brown treat made from beans",
        "a confection derived from fermented theobroma cacao polyphenols",
    ),
    (
        "a glacier",
        "a very big slow river of ice",
        "a persistent cryospheric mass deforming through basal sliding",
    ),
)

QUESTIONS = (
    "What is {t}?",
    "Tell me about {t}.",
    "Explain {t}.",
    "Can you describe {t}?",
    "Why does {t} matter?",
    "How would you explain {t}?",
)

BACKGROUND = {
    "P1A": (
        "This is why kids learn about {t} at school.",
        "Also, you can see {t} in lots of picture books.",
        "For example, many people like to talk about {t} with their family.",
        "This means {t} is a part of our daily life.",
    ),
    "P1B": (
        "Consequently, contemporary research characterizes {t} through quantitative modeling.",
        "Furthermore, the empirical literature on {t} emphasizes mechanistic hypotheses.",
        "For example, interdisciplinary investigations of {t} leverage computational simulations.",
        "This means theoretical frameworks describing {t} remain methodologically contested.",
    ),
}
OPENERS = {
    "P3A": ("Great question, friend!", "Oh, I love this one, buddy!", "Happy to help, my friend!"),
    "P3B": ("Ugh, fine.", "Obviously.", "Whatever."),
}
CLOSERS = {
    "P3A": ("Haha, hope that made you smile!", "Stay awesome, buddy!", "Have fun with it, friend! Haha!"),
    "P3B": ("Figure out the rest yourself.", "Stop bothering me.", "Do not ask again."),
}


@dataclass(frozen=True)
class Example:
    instruction: str
    combination: str  # e.g. "P1A,P2B,P3A": the style of each axis the response is written in
    response: str


def instructions() -> list[str]:
    """Every instruction of the corpus (topics x questions), in a fixed order."""
    return [q.format(t=name) for name, _, _ in TOPICS for q in QUESTIONS]


def split_instructions(held_out: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, held_out) instructions: a seeded random sample of `held_out` instructions is kept out."""
    every = instructions()
    if not 0 <= held_out < len(every):
        raise ValueError(f"held_out must be in [0, {len(every)}), got {held_out}")
    rng = random.Random(seed)
    kept_out = set(rng.sample(range(len(every)), held_out))
    train = [x for i, x in enumerate(every) if i not in kept_out]
    return train, [x for i, x in enumerate(every) if i in kept_out]


def _topic_of(instruction: str) -> tuple[str, str, str]:
    for topic in TOPICS:
        if instruction in (q.format(t=topic[0]) for q in QUESTIONS):
            return topic
    raise ValueError(f"instruction {instruction!r} is not from the demo corpus")


def write_response(instruction: str, combination: str, rng: random.Random) -> str:
    """One response to a corpus instruction in the given style combination (phrases drawn with `rng`)."""
    expertise, informativeness, style = combination.split(",")
    name, simple, technical = _topic_of(instruction)
    definition = simple if expertise == "P1A" else technical
    sentences = [rng.choice(OPENERS[style]), f"{name[0].upper()}{name[1:]} is {definition}."]
    if informativeness == "P2B":
        sentences += [s.format(t=name) for s in rng.sample(BACKGROUND[expertise], 2)]
    sentences.append(rng.choice(CLOSERS[style]))
    return " ".join(sentences)


def build_corpus(instructions_: list[str], variants: int, seed: int) -> list[Example]:
    """Each instruction answered `variants` times in each of the 8 combinations, deterministically."""
    if variants < 1:
        raise ValueError(f"variants must be >= 1, got {variants}")
    rng = random.Random(seed)
    return [
        Example(instruction, combination, write_response(instruction, combination, rng))
        for instruction in instructions_
        for combination in COMBINATIONS
        for _ in range(variants)
    ]


def expert_prompt(instruction: str) -> str:
    """What an expert reads: the plain instruction in the prompt format (an expert *is* its preference)."""
    return default_registry().format_prompt(instruction)


def pcm_prompt(instruction: str, combination: str) -> str:
    """What the PCM reads: the instruction followed by the preference prompts of the combination."""
    registry = default_registry()
    return registry.format_prompt(instruction, registry.parse(combination))
