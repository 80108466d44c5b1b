"""What a run trains and evaluates on: the known sets fetched on first use into the default data
root, the training images held whole or (larger than --data-memory) streamed a part at a time, and
the evaluation pairs."""

from pathlib import Path

from checkpoint import training_sets
from data import DEGRADATIONS, ImagePairs, TrainingPatches, held_bytes, shared_images
from download import fetch_on_first_use
from files import writable_folder
from options import parse_bytes, training_folders
from processes import Processes
from streaming import StreamedPatches
from tensorboard_log import folder_of


def fetch_sets_on_first_use(args: dict, main: bool) -> None:
    """In process 0 (`main`), the known sets the run names (--train-set and --eval-set by name) that the
    default data root lacks, fetched there (download.fetch_on_first_use); a folder given by path is
    left as it is."""
    if main:
        names = [name for name in [*training_sets(args), args["eval_set"]] if Path(name).name == name]
        fetch_on_first_use(args["data_root"], names)


def load_data(args: dict, processes: Processes) -> tuple[TrainingPatches | StreamedPatches, ImagePairs | list]:
    """The training patches (on the training device) and, for rank 0, the evaluation pairs (read an
    image at a time at every evaluation); rank 0 also makes sure the checkpoint folder can be
    written before any training."""
    root, folders = Path(args["data_root"]), training_folders(args)
    kinds = len(DEGRADATIONS) if args["degradation"] == "mixed" else 1
    needed, budget = held_bytes(folders, args["scale"], args["zooms"], kinds), parse_bytes(args["data_memory"])
    if needed <= budget:  # all at once: the same batches as ever
        patches = TrainingPatches(folders, args["scale"], args["patch_size"], args["stride"],
                                  args["zooms"], processes.device, args["degradation"])
    else:  # a part at a time, each process its own share, every image read whole once first
        processes.say(f"the training images take {needed / 1e3:,.0f} KB, more than --data-memory "
                      f"{args['data_memory']}: streamed in parts of up to {budget // 2 / 1e3:,.0f} KB a process")
        patches = StreamedPatches(folders, args["scale"], args["patch_size"], args["stride"], args["zooms"],
                                  processes.device, args["degradation"], budget, args["workers"],
                                  processes.rank, processes.world)
        count, seconds = patches.check_images()
        processes.say(f"checked by reading every image whole: {count} in {seconds:.1f} s")
    if not processes.main:
        return patches, []
    if shared := shared_images(folders, root / args["eval_set"]):
        processes.say(f"note: {len(shared)} training image(s) are also in the evaluation set, e.g. {shared[0]}")
    writable_folder(Path(args["checkpoint_dir"]), "checkpoint folder")
    if board := folder_of(args):
        writable_folder(board, "TensorBoard folder")
    evaluated_as = "matlab" if args["degradation"] == "matlab" else "pil"  # mixed training: evaluated on Pillow's
    return patches, ImagePairs(root / args["eval_set"], args["scale"], degradation=evaluated_as)
