//! The parameter store: every persistent tensor of a network (parameters,
//! batch-norm running statistics, loss class weights, SGD velocities and
//! RMSprop mean squares) by name, with initialisation from the program's
//! initialisers and a fixed seed.

use std::collections::BTreeMap;

use ldnc_ir::op::{Init, Role};
use ldnc_ir::program::Program;
use ldnc_ir::TensorType;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// One persistent tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub ty: TensorType,
    pub role: Role,
    pub data: Vec<f32>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Store {
    pub entries: BTreeMap<String, Entry>,
}

impl Store {
    /// Creates and initialises every persistent value of `programs`. Tensors are
    /// initialised in name order from one generator seeded with `seed`, so the same
    /// seed gives the same weights.
    pub fn init(programs: &[&Program], seed: u64) -> Store {
        let mut store = Store::default();
        let mut inits = BTreeMap::new();
        for program in programs {
            for v in program.persistent() {
                if v.role == Role::Update {
                    continue;
                }
                inits.entry(v.name.clone()).or_insert((
                    v.ty.clone(),
                    v.role,
                    v.init.unwrap_or(Init::Zeros),
                ));
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for (name, (ty, role, init)) in inits {
            let data = initial_values(&ty, init, &mut rng);
            store.entries.insert(name, Entry { ty, role, data });
        }
        store
    }

    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.entries.get(name).map(|e| e.data.as_slice())
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut [f32]> {
        self.entries.get_mut(name).map(|e| e.data.as_mut_slice())
    }

    /// Moves a tensor's data out (to update it next to another tensor); `put`
    /// returns it.
    pub fn take(&mut self, name: &str) -> Option<Vec<f32>> {
        self.entries
            .get_mut(name)
            .map(|e| std::mem::take(&mut e.data))
    }

    pub fn put(&mut self, name: &str, data: Vec<f32>) {
        if let Some(e) = self.entries.get_mut(name) {
            e.data = data;
        }
    }

    /// Number of trainable scalars.
    pub fn param_count(&self) -> usize {
        self.entries
            .values()
            .filter(|e| e.role == Role::Param)
            .map(|e| e.data.len())
            .sum()
    }
}

fn initial_values(ty: &TensorType, init: Init, rng: &mut rand::rngs::StdRng) -> Vec<f32> {
    let n = ty.per_item();
    match init {
        Init::HeNormal { fan } => {
            let std = (2.0 / fan.max(1) as f64).sqrt();
            let normal = Normal::new(0.0, std).expect("standard deviation is finite");
            (0..n).map(|_| normal.sample(rng) as f32).collect()
        }
        Init::Uniform { bound } => (0..n).map(|_| rng.gen_range(-bound..=bound)).collect(),
        Init::BnAffine => {
            let c = n / 2;
            (0..n).map(|i| if i < c { 1.0 } else { 0.0 }).collect()
        }
        Init::RunningStats => {
            let c = n / 2;
            (0..n).map(|i| if i < c { 0.0 } else { 1.0 }).collect()
        }
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
    }
}
